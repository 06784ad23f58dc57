"""jdcloud-image-sync: a PostgreSQL copy of JD Cloud's VM image catalogue."""

__version__ = "0.1.0"

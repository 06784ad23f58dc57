"""The benchmark: this service against a fetch-only floor and the SDK script a user would write.

``python -m bench`` (``make bench``) runs every phase against one simulator process and
one database and prints the table; see ``bench/README.md``. Each measured phase runs
in a subprocess of its own (:mod:`bench.phases`) so its peak RSS is its own and the
simulator never shares its CPU or GIL.
"""

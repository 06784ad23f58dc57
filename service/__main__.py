"""``python -m service``: the same as the ``image-sync`` command."""

from service.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

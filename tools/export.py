"""Thin wrapper: `python tools/export.py MODEL_OR_RUN --out saved_models/kneetf [...]` is
`kneetf export ...` (see `kneetf export --help`)."""
from __future__ import annotations

import sys

from kneetf.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))

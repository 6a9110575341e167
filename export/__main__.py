"""``python -m export``: the same as ``edge-export``."""

import sys

from .cli import main

if __name__ == "__main__":  # not when a spawned worker process re-imports this module
    sys.exit(main())

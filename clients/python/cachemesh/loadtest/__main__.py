"""``python -m cachemesh.loadtest``: see ``cachemesh.loadtest.cli``."""

import sys

from cachemesh.loadtest.cli import main

if __name__ == "__main__":
    sys.exit(main())

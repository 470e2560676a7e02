"""``python -m pycosdist ...`` = the ``pycosdist`` command (the application in :mod:`pycosdist.denoise`)."""

import sys

from .denoise.cli import main

# The guard: worker processes that are spawned (the demo's concurrent students) import this module again.
if __name__ == "__main__":
    sys.exit(main())

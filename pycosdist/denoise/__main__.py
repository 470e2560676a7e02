"""``python -m pycosdist.denoise ...`` = the ``pycosdist`` command."""

import sys

from .cli import main

# The guard: worker processes that are spawned (the demo's concurrent students) import this module again.
if __name__ == "__main__":
    sys.exit(main())

"""``python -m pycosdist.denoise ...`` = the ``pycosdist`` command."""

import sys

from .cli import main

sys.exit(main())

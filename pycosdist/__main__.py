"""``python -m pycosdist ...`` = the ``pycosdist`` command (the application in :mod:`pycosdist.denoise`)."""

import sys

from .denoise.cli import main

sys.exit(main())

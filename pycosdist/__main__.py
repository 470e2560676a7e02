"""``python -m pycosdist ...`` = the ``pycosdist`` command."""

import sys

from .cli import main

sys.exit(main())

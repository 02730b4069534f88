"""``python -m engine``: the same as the ``jetpool`` command."""

import sys

from engine.cli import main

sys.exit(main())

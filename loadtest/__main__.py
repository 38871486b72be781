"""``python -m loadtest``: the same as ``meridian loadtest``."""

import sys

from loadtest.cli import main

sys.exit(main())

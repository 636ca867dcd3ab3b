"""``python -m bench``: the same commands as ``cast bench``."""

import sys

from bench.cli import main

sys.exit(main())

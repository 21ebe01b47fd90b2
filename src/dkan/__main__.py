"""``python -m dkan``: the dkan command line (see :mod:`dkan.cli`)."""

import sys

from dkan.cli import main

sys.exit(main())

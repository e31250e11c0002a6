"""`python -m fastadapter ...`: the same command line as the `fastadapter` script."""

import sys

from .cli import main

sys.exit(main())

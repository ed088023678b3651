"""`python -m minildm` is the `minildm` command."""

import sys

from minildm.cli import main

sys.exit(main())

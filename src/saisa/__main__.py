"""`python -m saisa ...` (e.g. under `accelerate launch -m saisa train ...`) is the `saisa` command."""

import sys

from saisa.cli import main

sys.exit(main())

"""`python -m esm_gearnet COMMAND ...`: the `esm-gearnet` command."""
import sys

from .commands import main

sys.exit(main())

"""`python -m alignment ...` (what `accelerate launch -m alignment` and `torchrun -m alignment` run): the
`align` command line, which sits above this package (align/cli.py); nothing in alignment/ imports it."""

import sys

from align.cli import main

sys.exit(main())

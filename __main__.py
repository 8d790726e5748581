"""`python -m noisyseg` (also what `torchrun -m noisyseg` runs)."""

import sys

from noisyseg.cli import main

sys.exit(main())

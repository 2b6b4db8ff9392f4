"""`python -m scvi_scale.cli ...` (torchrun starts the ranks this way)."""

import sys

from scvi_scale.cli import main

sys.exit(main())

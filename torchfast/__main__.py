"""``python -m torchfast``: the same command line as the ``torchfast`` entry point."""
import sys

from .cli import main

sys.exit(main())

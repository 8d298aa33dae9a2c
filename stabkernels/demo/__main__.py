"""``python -m stabkernels.demo``: what ``python -m stabkernels demo`` runs (the old ``stabkernels/demo.py`` ran
so)."""
import sys

from .cli import main

sys.exit(main())

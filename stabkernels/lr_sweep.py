"""The old path of :mod:`stabkernels.demo.lr_sweep`: the same module object (importing it here imports that)."""
import sys

from .demo import lr_sweep

sys.modules[__name__] = lr_sweep

"""The old path of :mod:`stabkernels.demo.lm`: the same module object (importing it here imports that)."""
import sys

from .demo import lm

sys.modules[__name__] = lm

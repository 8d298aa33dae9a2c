"""The old path of :mod:`stabkernels.demo.digits`: the same module object (importing it here imports that)."""
import sys

from .demo import digits

sys.modules[__name__] = digits

"""The ``torch.ops.stabkernels`` library: every public op is defined here once, by :func:`define_op`.

Each op's schema ends in ``str backend``; its single kernel looks up the implementation registered for that
backend (see :mod:`stabkernels.backend`) and calls it. A fake kernel makes the op traceable by
torch.compile and checkable by ``torch.library.opcheck``. ``Library.define``/``impl`` costs about 4 us per
call where ``torch.library.custom_op`` costs about 11 us, which matters for ops called every step.
"""
from __future__ import annotations

from typing import Callable

import torch

from . import backend as _backend

LIB = torch.library.Library("stabkernels", "DEF")


def define_op(name: str, schema: str, fake: Callable, tags=()) -> torch._ops.OpOverloadPacket:
    """Defines ``stabkernels::<name><schema>``; ``schema`` must end with ``str backend)``.

    Returns ``torch.ops.stabkernels.<name>``."""
    if not schema.replace(" ", "").split("->")[0].endswith(",strbackend)"):
        raise ValueError(f"{name}: the schema must end with 'str backend', got {schema!r}")
    LIB.define(name + schema, tags=tags)

    def kernel(*args):
        return _backend.implementation(name, args[-1])(*args[:-1])

    LIB.impl(name, kernel, "CompositeExplicitAutograd")
    torch.library.register_fake(f"stabkernels::{name}", fake, lib=LIB)
    return getattr(torch.ops.stabkernels, name)

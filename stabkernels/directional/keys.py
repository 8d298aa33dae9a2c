"""The direction stream's keys as the directional ops take them (docs/spec.md 3.4 step 1): a seed checked and
reduced to 64 bits, and the (probes, tensors) key table built where the chosen backend reads it: on the device
for the GPU backends (no host-to-device copy in a step), on the host for the others."""
from __future__ import annotations

import torch
from torch import Tensor

from .. import backend as _backend
from .._launch_plan import arange
from .._stream import MASK64, key_table, signed64, splitmix64, splitmix64_tensor


@torch.compiler.disable  # its inputs are host scalars that change every probe: never baked into a graph
def device_key_table(seed: int, first_probe: int, num_probes: int, count: int, device) -> Tensor:
    """:func:`key_table` for probes first_probe .. first_probe + num_probes - 1, computed on ``device`` from scalar
    arguments only, so no host-to-device copy (the GPU backends' keys; on a CUDA graph replay the scalars are
    those of the capture): one Triton launch where triton is available, else a few elementwise torch ops."""
    seed_hash = signed64(splitmix64(seed & MASK64))
    if _backend.why_unavailable("triton", device) is None:
        from ..triton.directional import key_table as triton_key_table
        return triton_key_table(seed_hash, signed64(first_probe & MASK64), num_probes, count, device)
    probes = arange(num_probes, device) + signed64(first_probe & MASK64)
    h = splitmix64_tensor(probes ^ seed_hash)
    return splitmix64_tensor(h[:, None] ^ arange(count, device)[None, :])


def seed_int(seed) -> int:
    """``seed`` (an int, or a one-element tensor read on the host) as the stream's unsigned 64-bit seed."""
    if isinstance(seed, Tensor):
        seed = int(seed)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return seed & MASK64


def op_keys(seed: int, first_probe: int, num_probes: int, count: int, backend: str, device) -> Tensor:
    """The (num_probes, count) key table where ``backend`` reads it: built on the device for the GPU backends
    (no host-to-device copy in a step), on the host for the others."""
    if backend in ("triton", "cuda"):
        return device_key_table(seed, first_probe, num_probes, count, device)
    return key_table(seed, range(first_probe, first_probe + num_probes), count)

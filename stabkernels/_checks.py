"""Input validation shared by every op: errors that name the argument and the problem."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The math dtype for a storage dtype: float64 for float64, float32 otherwise (SPEC 6)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def grouped_acc_dtype(tensors) -> torch.dtype:
    """The result dtype of a reduction over a list of tensors: float64 if any is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_float_tensor(x, name: str, ndim: int | None = None) -> None:
    """A dense tensor of a supported float dtype (and the given number of dimensions)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise ValueError(f"{name} must be a dense (strided) tensor, got layout {x.layout}")
    if x.dtype not in FLOAT_DTYPES:
        kind = "complex" if x.dtype.is_complex else "integer/bool" if not x.dtype.is_floating_point else "unsupported"
        raise TypeError(
            f"{name} must be float32, float64, float16 or bfloat16, got {kind} dtype {x.dtype}"
        )
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)}")


def as_list(ts, name: str) -> list:
    """``ts`` as a list; one tensor is refused (it would iterate as its rows)."""
    if isinstance(ts, torch.Tensor):
        raise TypeError(f"{name} must be a list of tensors, got a single tensor (wrap it in a list)")
    return list(ts)


def check_tensor_list(ts, name: str, *, allow_empty: bool = False) -> list[torch.Tensor]:
    """A list (not one tensor, which would iterate as its rows) of dense float tensors on one device."""
    ts = as_list(ts, name)
    if not ts and not allow_empty:
        raise ValueError(f"{name} is empty")
    # the detailed per-tensor checks only when a quick pass finds a problem (this runs on every step)
    if not all(isinstance(t, torch.Tensor) and t.layout == torch.strided and t.dtype in FLOAT_DTYPES for t in ts):
        for i, t in enumerate(ts):
            check_float_tensor(t, f"{name}[{i}]")
    devices = {t.device for t in ts}
    if len(devices) > 1:
        raise ValueError(f"{name} must all be on one device, got {sorted(str(d) for d in devices)}")
    return ts

"""Small helpers shared by the Triton kernel modules. Launch tables come from stabkernels/_launch_plan.py (built
once per tensor list, kept on the device); per-tensor sums are reduced in a fixed order (per-program partials,
then :func:`segment_sums`), never with float atomics, so they are the same bits on every run."""
import torch
import triton
import triton.language as tl

from .._launch_plan import Group

ACC_DTYPE = {torch.float64: tl.float64}


def tl_acc(dtype: torch.dtype):
    """Triton math dtype for a storage dtype: fp64 for fp64, fp32 otherwise."""
    return ACC_DTYPE.get(dtype, tl.float32)


TL_STORAGE = {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16,
              torch.bfloat16: tl.bfloat16}


@triton.jit
def chunk_range(chunk_tensor, chunk_start, numels):
    """(tensor index, first element, tensor size) of this program's chunk in a grouped launch."""
    c = tl.program_id(0)
    i = tl.load(chunk_tensor + c)
    return i, tl.load(chunk_start + c), tl.load(numels + i)


@triton.jit
def _segment_sums_kernel(partials, first, count, out, width, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
    # member t's programs are consecutive: out[t, :] = sum of partials[first[t] : first[t] + count[t], :], in a
    # fixed order (blocks of BLOCK rows in sequence, a fixed tree inside a block)
    t = tl.program_id(0)
    f = tl.load(first + t)
    n = tl.load(count + t)
    cols = tl.arange(0, WIDTH)
    acc = tl.zeros([BLOCK, WIDTH], tl.float64)
    for r0 in range(0, n, BLOCK):
        rows = r0 + tl.arange(0, BLOCK)
        acc += tl.load(partials + (f + rows)[:, None] * width + cols[None, :],
                       mask=(rows < n)[:, None] & (cols < width)[None, :], other=0.0).to(tl.float64)
    tl.store(out + t * width + cols, tl.sum(acc, axis=0).to(out.dtype.element_ty), mask=cols < width)


def in_order(groups, parts: list) -> torch.Tensor:
    """The dtype groups' per-member results (one tensor per group, rows = members) in the tensor list's order,
    scattered on the device with the groups' cached index tensors (no copy when there is one group)."""
    if len(groups) == 1:
        return parts[0]
    n = sum(g.size for g in groups)
    out = torch.empty((n,) + tuple(parts[0].shape[1:]), dtype=parts[0].dtype, device=parts[0].device)
    for g, p in zip(groups, parts):
        out.index_copy_(0, g.index, p)
    return out


def segment_sums(partials: torch.Tensor, group: Group) -> torch.Tensor:
    """Per member of ``group``: the sum of its programs' partials (``partials`` is (num_chunks,) or
    (num_chunks, W)), in float64 and a fixed order; the result has ``partials``' dtype and trailing shape. The
    second pass reads num_chunks * W numbers: one per 4096-1024 elements, well under 0.1% of the first pass."""
    width = 1 if partials.dim() == 1 else partials.shape[1]
    out = torch.empty((group.size,) + tuple(partials.shape[1:]), dtype=partials.dtype, device=partials.device)
    _segment_sums_kernel[(group.size,)](partials, group.first_chunk, group.chunk_count, out, width,
                                        WIDTH=triton.next_power_of_2(width), BLOCK=64)
    return out


@triton.jit
def div_ieee(a, b, ACC: tl.constexpr):
    """a / b rounded to nearest (Triton's float32 ``/`` is an approximate division on a GPU; float64's is IEEE)."""
    if ACC == tl.float32:
        return tl.div_rn(a, b)
    else:
        return a / b


@triton.jit
def smallest_normal(ACC: tl.constexpr):
    """The smallest normal number of the math type (numeric_limits<A>::min(), torch.finfo(A).tiny)."""
    if ACC == tl.float32:
        return tl.full([], 1.1754943508222875e-38, tl.float32)
    else:
        return tl.full([], 2.2250738585072014e-308, tl.float64)


@triton.jit
def sqrt_ieee(x, ACC: tl.constexpr):
    """sqrt(x) rounded to nearest (Triton's float32 ``tl.sqrt`` is ``sqrt.approx.ftz`` on a GPU)."""
    if ACC == tl.float32:
        return tl.sqrt_rn(x)
    else:
        return tl.sqrt(x)

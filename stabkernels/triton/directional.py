"""Triton kernels of the directional family. The stream (stabkernels/_stream.py, docs/spec.md 3.4) uses
``tl.randint4x(key, counter)`` for Philox and the stream's float32 Box-Muller, so it matches the torch
reference and the C++ kernels bit for bit: the stream kernels are launched with ``enable_fp_fusion=False``
(Triton would otherwise contract the Box-Muller arithmetic into FMAs on a GPU, changing the bits of about 8%
of the normals). One program handles BLOCK Philox counters (4 * BLOCK elements) of one tensor; launch tables
come from the cached launch plan, the keys are a device tensor indexed by each tensor's global index, and sums
are per-program float64 partials reduced in a fixed order (no atomics), finished on the device by torch."""
import torch
import triton
import triton.language as tl

from .. import _launch_plan as plan
from .. import _stream as stream
from .._checks import acc_dtype, grouped_acc_dtype
from .._orthograd import orthograd_coefficients
from ._common import TL_STORAGE, chunk_range, in_order, segment_sums, tl_acc

# launch option of every kernel that generates the stream: no FP contraction, the reference's rounding
STREAM = dict(enable_fp_fusion=False)

BLOCK = 256  # counters per program: 1024 elements


# The stream's float32 constants, from its specification (stabkernels/_stream.py), not written again.
_SQRT2, _LN2, _PI_OVER_4 = tl.constexpr(stream.SQRT2), tl.constexpr(stream.LN2), tl.constexpr(stream.PI_OVER_4)
_L3, _L5, _L7, _L9 = (tl.constexpr(c) for c in stream.LOG_COEFS)
_S3, _S5, _S7, _S9 = (tl.constexpr(c) for c in stream.SIN_COEFS)
_C2, _C4, _C6, _C8, _C10 = (tl.constexpr(c) for c in stream.COS_COEFS)
_UNIT_EPS = tl.constexpr(stream.UNIT_EPS)


@triton.jit
def _box_muller(wa, wb):
    """Step 3 of the stream (csrc/philox.h, box_muller): two float32 normals from two uint32 Philox words."""
    x = (2 * (wa >> 9) + 1).to(tl.float32)
    bits = x.to(tl.uint32, bitcast=True)
    e = (bits >> 23).to(tl.int32) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
    big = m >= _SQRT2
    m = tl.where(big, m * 0.5, m)
    e = tl.where(big, e + 1, e)
    s = tl.div_rn(m - 1.0, m + 1.0)
    z = s * s
    ln_u = (e - 24).to(tl.float32) * _LN2 + s * (2.0 + z * (_L3 + z * (_L5 + z * (_L7 + z * _L9))))
    r = tl.sqrt_rn(-2.0 * ln_u)
    o = wb >> 29
    k = (wb >> 6) & 0x7FFFFF
    k = tl.where((o & 1) == 1, 0x7FFFFF - k, k)
    t = (2 * k + 1).to(tl.float32) * 5.960464477539063e-08 * _PI_OVER_4  # (2k + 1) 2^-24 pi/4
    y = t * t
    sn = t * (1.0 + y * (_S3 + y * (_S5 + y * (_S7 + y * _S9))))
    cs = 1.0 + y * (_C2 + y * (_C4 + y * (_C6 + y * (_C8 + y * _C10))))
    swap = ((o ^ (o >> 1)) & 1) == 1
    a = tl.where(swap, sn, cs)
    b = tl.where(swap, cs, sn)
    a = tl.where(((o + 2) & 4) != 0, -a, a)
    b = tl.where((o & 4) != 0, -b, b)
    return r * a, r * b


@triton.jit
def _normals(key, ctr):
    """The four float32 normals of each counter in ``ctr`` (docs/spec.md 3.4, steps 2-3)."""
    w0, w1, w2, w3 = tl.randint4x(key, ctr)
    n0, n1 = _box_muller(w0, w1)
    n2, n3 = _box_muller(w2, w3)
    return n0, n1, n2, n3


@triton.jit
def _splitmix64(x):
    x = x + 0x9E3779B97F4A7C15
    z = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    return z ^ (z >> 31)


@triton.jit(do_not_specialize=["seed_hash", "first"])
def _keys_kernel(out, seed_hash, first, T, BLOCK: tl.constexpr):
    # key[k, t] = splitmix64(splitmix64(splitmix64(seed) ^ (first + k)) ^ t)  (docs/spec.md 3.4 step 1, uint64)
    k = tl.program_id(0)
    t = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    h = _splitmix64((first + k).to(tl.uint64) ^ seed_hash.to(tl.uint64))
    tl.store(out + k * T + t, _splitmix64(h ^ t.to(tl.uint64)).to(tl.int64, bitcast=True), mask=t < T)


def key_table(seed_hash: int, first_probe: int, num_probes: int, count: int, device) -> torch.Tensor:
    """The (num_probes, count) int64 key table computed on the device in one launch; ``seed_hash`` is
    splitmix64(seed) as a signed int64 (see stabkernels/_stream.py)."""
    out = torch.empty(num_probes, count, dtype=torch.int64, device=device)
    with plan.device_guard(torch.device(device)):
        _keys_kernel[(num_probes, triton.cdiv(count, 128))](out, seed_hash, first_probe, count, BLOCK=128)
    return out


@triton.jit
def _sq_sums_kernel(keys, gidx, numels, blk_tensor, blk_ctr, partials, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    t = tl.load(blk_tensor + b)
    n = tl.load(numels + t)
    ctr = tl.load(blk_ctr + b) + tl.arange(0, BLOCK).to(tl.int64)
    n0, n1, n2, n3 = _normals(tl.load(keys + tl.load(gidx + t)), ctr)
    e = 4 * ctr
    s = tl.where(e < n, n0.to(tl.float64) * n0, 0.0) + tl.where(e + 1 < n, n1.to(tl.float64) * n1, 0.0)
    s += tl.where(e + 2 < n, n2.to(tl.float64) * n2, 0.0) + tl.where(e + 3 < n, n3.to(tl.float64) * n3, 0.0)
    tl.store(partials + b, tl.sum(s, axis=0))


@triton.jit
def _write_kernel(keys, gidx, numels, blk_tensor, blk_ctr, sq_sums, src_tab, out_base, out_tab, sigma,
                  SRC: tl.constexpr, OUT: tl.constexpr, ACC: tl.constexpr, HAS_SRC: tl.constexpr,
                  FLAT: tl.constexpr, BLOCK: tl.constexpr):
    # out = d (HAS_SRC False) or theta + sigma * d (HAS_SRC), d = n * s in the math dtype ACC. FLAT: the outputs
    # are views of one buffer, out_tab holds their offsets in it (new outputs every call need no new table).
    b = tl.program_id(0)
    t = tl.load(blk_tensor + b)
    n = tl.load(numels + t)
    gi = tl.load(gidx + t)
    ctr = tl.load(blk_ctr + b) + tl.arange(0, BLOCK).to(tl.int64)
    s = _unit_scale(tl.load(sq_sums + gi)).to(ACC)
    sg = tl.load(sigma).to(ACC)
    if FLAT:
        out = out_base + tl.load(out_tab + t)
    else:
        out = tl.load(out_tab + t).to(tl.pointer_type(OUT))
    src = tl.load(src_tab + t).to(tl.pointer_type(SRC))
    n0, n1, n2, n3 = _normals(tl.load(keys + gi), ctr)
    e = 4 * ctr
    _write_one(out, src, e, n, n0, s, sg, ACC, HAS_SRC)
    _write_one(out, src, e + 1, n, n1, s, sg, ACC, HAS_SRC)
    _write_one(out, src, e + 2, n, n2, s, sg, ACC, HAS_SRC)
    _write_one(out, src, e + 3, n, n3, s, sg, ACC, HAS_SRC)


@triton.jit
def _unit_scale(sq_sum):
    """The stream's unit-norm scale of a tensor from its float64 sum of squares: 1 / (sqrt(S) + UNIT_EPS) in
    float64, rounded to float32 (the reference's operations, _stream.unit_scale_from_sum; float64 division and
    sqrt are IEEE in Triton)."""
    return (1.0 / (tl.sqrt(sq_sum) + tl.full((), _UNIT_EPS, tl.float64))).to(tl.float32)


@triton.jit
def _dots_finish_kernel(sums, out, K, T, BLOCK: tl.constexpr):
    # out[k] = sum_t g_t . n_{t,k} * s_{t,k}, the tensors in order (sums: (T, 2K), dots then sums of squares)
    k = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.float64)
    for t0 in range(0, T, BLOCK):
        t = t0 + tl.arange(0, BLOCK)
        m = t < T
        gn = tl.load(sums + t * 2 * K + k, mask=m, other=0.0)
        nn = tl.load(sums + t * 2 * K + K + k, mask=m, other=0.0)
        acc += tl.where(m, gn * _unit_scale(nn).to(tl.float64), 0.0)
    tl.store(out + k, tl.sum(acc, axis=0).to(out.dtype.element_ty))


@triton.jit
def _write_one(out, src, idx, n, nj, s, sg, ACC: tl.constexpr, HAS_SRC: tl.constexpr):
    mask = idx < n
    d = nj.to(ACC) * s
    if HAS_SRC:
        d = tl.load(src + idx, mask=mask, other=0.0).to(ACC) + sg * d
    tl.store(out + idx, d.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _dots_kernel(keys, K, T, gidx, g_tab, numels, blk_tensor, blk_ctr, partials, DTYPE: tl.constexpr,
                 BLOCK: tl.constexpr):
    # One block of g, loaded once; the K probes' normals are generated against it. Partials: per program,
    # K dot products then K sums of squares.
    b = tl.program_id(0)
    t = tl.load(blk_tensor + b)
    n = tl.load(numels + t)
    gi = tl.load(gidx + t)
    ctr = tl.load(blk_ctr + b) + tl.arange(0, BLOCK).to(tl.int64)
    e = 4 * ctr
    g = tl.load(g_tab + t).to(tl.pointer_type(DTYPE))
    g0 = tl.load(g + e, mask=e < n, other=0.0).to(tl.float64)
    g1 = tl.load(g + e + 1, mask=e + 1 < n, other=0.0).to(tl.float64)
    g2 = tl.load(g + e + 2, mask=e + 2 < n, other=0.0).to(tl.float64)
    g3 = tl.load(g + e + 3, mask=e + 3 < n, other=0.0).to(tl.float64)
    row = partials + b * 2 * K
    for k in range(K):
        n0, n1, n2, n3 = _normals(tl.load(keys + k * T + gi), ctr)
        a0 = tl.where(e < n, n0.to(tl.float64), 0.0)
        a1 = tl.where(e + 1 < n, n1.to(tl.float64), 0.0)
        a2 = tl.where(e + 2 < n, n2.to(tl.float64), 0.0)
        a3 = tl.where(e + 3 < n, n3.to(tl.float64), 0.0)
        tl.store(row + k, tl.sum(g0 * a0 + g1 * a1 + g2 * a2 + g3 * a3, axis=0))
        tl.store(row + K + k, tl.sum(a0 * a0 + a1 * a1 + a2 * a2 + a3 * a3, axis=0))


@triton.jit
def _shard_normals_kernel(keys, offsets, numels, blk_tensor, blk_ctr, out_tab, partials, BLOCK: tl.constexpr):
    # the normals of elements [offset, offset + n) of stream t: counters from offset // 4, local index 4c + j - offset
    b = tl.program_id(0)
    t = tl.load(blk_tensor + b)
    n = tl.load(numels + t)
    off = tl.load(offsets + t)
    ctr = tl.load(blk_ctr + b) + tl.arange(0, BLOCK).to(tl.int64)
    out = tl.load(out_tab + t).to(tl.pointer_type(tl.float32))
    n0, n1, n2, n3 = _normals(tl.load(keys + t), ctr)
    e = 4 * ctr - off
    s = _store_in_range(out, e, n, n0) + _store_in_range(out, e + 1, n, n1)
    s += _store_in_range(out, e + 2, n, n2) + _store_in_range(out, e + 3, n, n3)
    tl.store(partials + b, tl.sum(s, axis=0))


@triton.jit
def _store_in_range(out, idx, n, v):
    mask = (idx >= 0) & (idx < n)
    tl.store(out + idx, v, mask=mask)
    return tl.where(mask, v.to(tl.float64) * v, 0.0)


@triton.jit
def _ortho_sums_kernel(w_tab, g_tab, numels, chunk_tensor, chunk_start, partials, DTYPE: tl.constexpr,
                       CHUNK: tl.constexpr):
    t, start, n = chunk_range(chunk_tensor, chunk_start, numels)
    idx = start + tl.arange(0, CHUNK)
    m = idx < n
    w = tl.load(tl.load(w_tab + t).to(tl.pointer_type(DTYPE)) + idx, mask=m, other=0.0).to(tl.float64)
    g = tl.load(tl.load(g_tab + t).to(tl.pointer_type(DTYPE)) + idx, mask=m, other=0.0).to(tl.float64)
    row = partials + 3 * tl.program_id(0)
    tl.store(row, tl.sum(w * g, axis=0))
    tl.store(row + 1, tl.sum(w * w, axis=0))
    tl.store(row + 2, tl.sum(g * g, axis=0))


@triton.jit
def _ortho_write_kernel(w_tab, g_tab, numels, chunk_tensor, chunk_start, coef, scale, DTYPE: tl.constexpr,
                        CHUNK: tl.constexpr):
    # float64: g - c w cancels when g is nearly parallel to w
    t, start, n = chunk_range(chunk_tensor, chunk_start, numels)
    idx = start + tl.arange(0, CHUNK)
    m = idx < n
    gp = tl.load(g_tab + t).to(tl.pointer_type(DTYPE))
    w = tl.load(tl.load(w_tab + t).to(tl.pointer_type(DTYPE)) + idx, mask=m, other=0.0).to(tl.float64)
    g = tl.load(gp + idx, mask=m, other=0.0).to(tl.float64)
    cc = tl.load(coef + t)
    s = tl.load(scale + t)
    r = (g - cc * w) * s
    if DTYPE == tl.float64:
        tl.store(gp + idx, r, mask=m)
    elif DTYPE == tl.float32:
        tl.store(gp + idx, r.to(tl.float32), mask=m)
    else:
        tl.store(gp + idx, _to_float32_odd(r).to(DTYPE), mask=m)


@triton.jit
def _to_float32_odd(r):
    """float64 -> float32 rounded to odd (truncated toward zero, last bit set when inexact): rounding that to a
    16-bit float to nearest gives the one correctly rounded float64 -> 16-bit result (as the CUDA kernel's single
    conversion), where two round-to-nearest steps could round twice (and the interpreter converts float64 to
    16 bits only through float32)."""
    f = r.to(tl.float32)
    back = f.to(tl.float64)
    bits = f.to(tl.int32, bitcast=True)
    bits = tl.where((back != r) & (tl.abs(back) > tl.abs(r)), bits - 1, bits)  # one ulp toward zero
    bits = tl.where(back != r, bits | 1, bits)
    return bits.to(tl.float32, bitcast=True)


def _stream_layout(tensors, dtypes=None):
    """Programs of BLOCK counters (4 * BLOCK elements) over each tensor's stream."""
    return plan.layout(tensors, BLOCK, unit=4, dtypes=dtypes)


def _stream_sq_sums(tensors, keys, device):
    """sum of n^2 over each tensor's stream, (T,) float64, in global order."""
    groups = _stream_layout(tensors, dtypes=[torch.float32] * len(tensors))  # one group: all tensors in order
    (g,) = groups
    partials = torch.empty(g.num_chunks, dtype=torch.float64, device=device)
    _sq_sums_kernel[(g.num_chunks,)](keys, g.index, g.numels, g.chunk_tensor, g.chunk_start, partials, BLOCK=BLOCK,
                                     **STREAM)
    return segment_sums(partials, g)


def _write(tensors, keys, outs, srcs, sigma, device):
    """out = d or src + sigma d for every tensor; ``outs`` None: new outputs (the directions, in the math dtype),
    returned as views of one buffer per dtype, whose offsets are cached by the sizes."""
    sums = _stream_sq_sums(tensors, keys, device)  # the kernel turns them into the stream's scales
    sig = plan.constants((sigma,), device)
    new = [None] * len(tensors)
    # one launch per output dtype; the math dtype (and the rounding of the scale) follows it
    out_dtypes = [acc_dtype(t.dtype) for t in tensors] if outs is None else [o.dtype for o in outs]
    for g in _stream_layout(tensors, dtypes=out_dtypes):
        if outs is None:
            sizes = [tensors[i].numel() for i in g.members]
            offs = plan.cached(("flat_offsets", device) + tuple(sizes),
                               lambda: plan.upload([sum(sizes[:j]) for j in range(len(sizes))], device))
            base = torch.empty(sum(sizes), dtype=g.dtype, device=device)
            for i, view in zip(g.members, base.split(sizes)):
                new[i] = view.view(tensors[i].shape)
            out_tab = offs
        else:
            base, out_tab = sums, plan.addresses(outs, g)  # base unused
        src_tab = plan.addresses(srcs, g) if srcs is not None else out_tab
        _write_kernel[(g.num_chunks,)](keys, g.index, g.numels, g.chunk_tensor, g.chunk_start,
                                       sums, src_tab, base, out_tab, sig,
                                       SRC=TL_STORAGE[srcs[g.members[0]].dtype if srcs is not None else g.dtype],
                                       OUT=TL_STORAGE[g.dtype], ACC=tl_acc(g.dtype), HAS_SRC=srcs is not None,
                                       FLAT=outs is None, BLOCK=BLOCK, **STREAM)
    return new


def random_directions(tensors, keys):
    device = tensors[0].device
    with plan.device_guard(device):
        return _write(tensors, keys, None, None, 0.0, device)


def perturb(params, keys, sigma, out):
    device = params[0].device
    with plan.device_guard(device):
        _write(params, keys, out, params, sigma, device)


def directional_dots(grads, keys):
    device = grads[0].device
    K, T = keys.shape
    flat = [g if g.is_contiguous() else g.contiguous() for g in grads]
    groups = _stream_layout(flat)
    with plan.device_guard(device):
        parts = []
        for g in groups:
            partials = torch.empty(g.num_chunks, 2 * K, dtype=torch.float64, device=device)
            _dots_kernel[(g.num_chunks,)](keys, K, T, g.index, plan.addresses(flat, g), g.numels, g.chunk_tensor,
                                          g.chunk_start, partials, DTYPE=TL_STORAGE[g.dtype], BLOCK=BLOCK, **STREAM)
            parts.append(segment_sums(partials, g))
        sums = in_order(groups, parts)  # (T, 2K)
        out = torch.empty(K, dtype=grouped_acc_dtype(grads), device=device)
        _dots_finish_kernel[(K,)](sums, out, K, T, BLOCK=128)
        return out


def orthograd_(params, grads, chunk=1024):
    device = params[0].device
    with plan.device_guard(device):
        for g in plan.layout(params, chunk):
            tabs = (plan.addresses(params, g), plan.addresses(grads, g), g.numels, g.chunk_tensor, g.chunk_start)
            partials = torch.empty(g.num_chunks, 3, dtype=torch.float64, device=device)
            _ortho_sums_kernel[(g.num_chunks,)](*tabs, partials, DTYPE=TL_STORAGE[g.dtype], CHUNK=chunk)
            coef, scale = orthograd_coefficients(*segment_sums(partials, g).unbind(1))
            _ortho_write_kernel[(g.num_chunks,)](*tabs, coef, scale, DTYPE=TL_STORAGE[g.dtype], CHUNK=chunk)


def shard_normals(out, keys, offsets):
    device = out[0].device
    (g,) = plan.layout(out, BLOCK, unit=4, starts=offsets)  # every out is float32: one group
    offs = plan.cached(("shard_offsets", device) + tuple(offsets), lambda: plan.upload(offsets, device))
    partials = torch.empty(g.num_chunks, dtype=torch.float64, device=device)
    with plan.device_guard(device):
        _shard_normals_kernel[(g.num_chunks,)](keys, offs, g.numels, g.chunk_tensor, g.chunk_start,
                                               plan.addresses(out, g), partials, BLOCK=BLOCK, **STREAM)
        return segment_sums(partials, g)

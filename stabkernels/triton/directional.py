"""Triton kernels of the directional family. The stream (stabkernels/directional.py) uses
``tl.randint4x(key, counter)`` for Philox and the stream's float32 Box-Muller, so it matches the torch
reference and the C++ kernels (bit for bit under the interpreter; on a GPU, up to fused multiply-adds).
One program handles BLOCK Philox counters (4 * BLOCK elements) of one tensor; sums are accumulated with
float64 atomics and finished on the device by torch."""
import torch
import triton
import triton.language as tl

from .. import directional as D
from .._checks import acc_dtype, grouped_acc_dtype
from ._common import TL_STORAGE, chunk_range, group_by_dtype, int_table, pointer_table, tl_acc

BLOCK = 256  # counters per program: 1024 elements


# The stream's float32 constants, from the reference (stabkernels/directional.py), not written again.
_SQRT2, _LN2, _PI_OVER_4 = tl.constexpr(D.SQRT2), tl.constexpr(D.LN2), tl.constexpr(D.PI_OVER_4)
_L3, _L5, _L7, _L9 = (tl.constexpr(c) for c in D.LOG_COEFS)
_S3, _S5, _S7, _S9 = (tl.constexpr(c) for c in D.SIN_COEFS)
_C2, _C4, _C6, _C8, _C10 = (tl.constexpr(c) for c in D.COS_COEFS)


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
    """The four float32 normals of each counter in ``ctr`` (SPEC stream steps 2-3)."""
    w0, w1, w2, w3 = tl.randint4x(key, ctr)
    n0, n1 = _box_muller(w0, w1)
    n2, n3 = _box_muller(w2, w3)
    return n0, n1, n2, n3


@triton.jit
def _sq_sums_kernel(keys, numels, blk_tensor, blk_ctr, sums, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    t = tl.load(blk_tensor + b)
    n = tl.load(numels + t)
    ctr = tl.load(blk_ctr + b) + tl.arange(0, BLOCK).to(tl.int64)
    n0, n1, n2, n3 = _normals(tl.load(keys + t), ctr)
    e = 4 * ctr
    s = tl.where(e < n, n0.to(tl.float64) * n0, 0.0) + tl.where(e + 1 < n, n1.to(tl.float64) * n1, 0.0)
    s += tl.where(e + 2 < n, n2.to(tl.float64) * n2, 0.0) + tl.where(e + 3 < n, n3.to(tl.float64) * n3, 0.0)
    tl.atomic_add(sums + t, tl.sum(s, axis=0))


@triton.jit
def _write_kernel(keys, numels, blk_tensor, blk_ctr, scales, src_tab, out_tab, sigma,
                  SRC: tl.constexpr, OUT: tl.constexpr, ACC: tl.constexpr, HAS_SRC: tl.constexpr,
                  BLOCK: tl.constexpr):
    # out = d (HAS_SRC False) or theta + sigma * d (HAS_SRC), d = n * s in the math dtype ACC.
    b = tl.program_id(0)
    t = tl.load(blk_tensor + b)
    n = tl.load(numels + t)
    ctr = tl.load(blk_ctr + b) + tl.arange(0, BLOCK).to(tl.int64)
    s = tl.load(scales + t).to(ACC)
    sg = tl.load(sigma).to(ACC)
    out = tl.load(out_tab + t).to(tl.pointer_type(OUT))
    src = tl.load(src_tab + t).to(tl.pointer_type(SRC))
    n0, n1, n2, n3 = _normals(tl.load(keys + t), ctr)
    e = 4 * ctr
    _write_one(out, src, e, n, n0, s, sg, ACC, HAS_SRC)
    _write_one(out, src, e + 1, n, n1, s, sg, ACC, HAS_SRC)
    _write_one(out, src, e + 2, n, n2, s, sg, ACC, HAS_SRC)
    _write_one(out, src, e + 3, n, n3, s, sg, ACC, HAS_SRC)


@triton.jit
def _write_one(out, src, idx, n, nj, s, sg, ACC: tl.constexpr, HAS_SRC: tl.constexpr):
    mask = idx < n
    d = nj.to(ACC) * s
    if HAS_SRC:
        d = tl.load(src + idx, mask=mask, other=0.0).to(ACC) + sg * d
    tl.store(out + idx, d.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _dots_kernel(keys, K, T, g_tab, numels, blk_tensor, blk_ctr, gn, nn, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    # One block of g, loaded once; the K probes' normals are generated against it.
    b = tl.program_id(0)
    t = tl.load(blk_tensor + b)
    n = tl.load(numels + t)
    ctr = tl.load(blk_ctr + b) + tl.arange(0, BLOCK).to(tl.int64)
    e = 4 * ctr
    g = tl.load(g_tab + t).to(tl.pointer_type(DTYPE))
    g0 = tl.load(g + e, mask=e < n, other=0.0).to(tl.float64)
    g1 = tl.load(g + e + 1, mask=e + 1 < n, other=0.0).to(tl.float64)
    g2 = tl.load(g + e + 2, mask=e + 2 < n, other=0.0).to(tl.float64)
    g3 = tl.load(g + e + 3, mask=e + 3 < n, other=0.0).to(tl.float64)
    for k in range(K):
        n0, n1, n2, n3 = _normals(tl.load(keys + k * T + t), ctr)
        a0 = tl.where(e < n, n0.to(tl.float64), 0.0)
        a1 = tl.where(e + 1 < n, n1.to(tl.float64), 0.0)
        a2 = tl.where(e + 2 < n, n2.to(tl.float64), 0.0)
        a3 = tl.where(e + 3 < n, n3.to(tl.float64), 0.0)
        tl.atomic_add(gn + k * T + t, tl.sum(g0 * a0 + g1 * a1 + g2 * a2 + g3 * a3, axis=0))
        tl.atomic_add(nn + k * T + t, tl.sum(a0 * a0 + a1 * a1 + a2 * a2 + a3 * a3, axis=0))


@triton.jit
def _shard_normals_kernel(keys, offsets, numels, blk_tensor, blk_ctr, out_tab, sums, BLOCK: tl.constexpr):
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
    tl.atomic_add(sums + t, tl.sum(s, axis=0))


@triton.jit
def _store_in_range(out, idx, n, v):
    mask = (idx >= 0) & (idx < n)
    tl.store(out + idx, v, mask=mask)
    return tl.where(mask, v.to(tl.float64) * v, 0.0)


@triton.jit
def _ortho_sums_kernel(w_tab, g_tab, numels, chunk_tensor, chunk_start, sums, DTYPE: tl.constexpr,
                       CHUNK: tl.constexpr):
    t, start, n = chunk_range(chunk_tensor, chunk_start, numels)
    idx = start + tl.arange(0, CHUNK)
    m = idx < n
    w = tl.load(tl.load(w_tab + t).to(tl.pointer_type(DTYPE)) + idx, mask=m, other=0.0).to(tl.float64)
    g = tl.load(tl.load(g_tab + t).to(tl.pointer_type(DTYPE)) + idx, mask=m, other=0.0).to(tl.float64)
    tl.atomic_add(sums + 3 * t, tl.sum(w * g, axis=0))
    tl.atomic_add(sums + 3 * t + 1, tl.sum(w * w, axis=0))
    tl.atomic_add(sums + 3 * t + 2, tl.sum(g * g, axis=0))


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
    if DTYPE != tl.float64:
        r = r.to(tl.float32)  # the interpreter converts fp64 -> bf16 only through fp32
    tl.store(gp + idx, r.to(DTYPE), mask=m)


def _blocks(tensors, device):
    """Per program: tensor index and first Philox counter (BLOCK counters = 4 * BLOCK elements each)."""
    blocks = [(i, c) for i, t in enumerate(tensors) for c in range(0, max((t.numel() + 3) // 4, 1), BLOCK)]
    return (len(blocks), int_table((t.numel() for t in tensors), device), int_table((b[0] for b in blocks), device),
            int_table((b[1] for b in blocks), device))


def _stream_sq_sums(tensors, keys, device):
    nblk, numels, blk_t, blk_c = _blocks(tensors, device)
    sums = torch.zeros(len(tensors), dtype=torch.float64, device=device)
    _sq_sums_kernel[(nblk,)](keys, numels, blk_t, blk_c, sums, BLOCK=BLOCK)
    return sums, (nblk, numels, blk_t, blk_c)


def _write(tensors, keys, outs, srcs, sigma, device):
    sums, (nblk, numels, blk_t, blk_c) = _stream_sq_sums(tensors, keys, device)
    inv = (1.0 / (sums.sqrt() + 1e-12)).to(torch.float32)  # the stream's scale, rounded to float32
    sig = torch.tensor([sigma], dtype=torch.float64, device=device)
    # one launch per output dtype; the math dtype (and the rounding of the scale) follows it
    for dtype, idx in group_by_dtype(outs).items():
        acc = acc_dtype(dtype)
        sub_keys = keys[idx]
        sub = [tensors[i] for i in idx]
        n2, numels2, blk_t2, blk_c2 = _blocks(sub, device)
        src_tab = pointer_table([srcs[i] for i in idx], device) if srcs is not None else pointer_table(
            [outs[i] for i in idx], device)
        _write_kernel[(n2,)](sub_keys, numels2, blk_t2, blk_c2, inv[idx].to(acc), src_tab,
                             pointer_table([outs[i] for i in idx], device), sig,
                             SRC=TL_STORAGE[srcs[idx[0]].dtype] if srcs is not None else TL_STORAGE[dtype],
                             OUT=TL_STORAGE[dtype], ACC=tl_acc(dtype), HAS_SRC=srcs is not None, BLOCK=BLOCK)


def random_directions(tensors, keys):
    device = tensors[0].device
    outs = [torch.empty(t.shape, dtype=acc_dtype(t.dtype), device=device) for t in tensors]
    _write(tensors, keys.to(device), outs, None, 0.0, device)
    return outs


def perturb(params, keys, sigma, out):
    device = params[0].device
    _write(params, keys.to(device), out, params, sigma, device)


def directional_dots(grads, keys):
    device = grads[0].device
    keys = keys.to(device)
    K, T = keys.shape
    flat = [g.contiguous() for g in grads]
    out_dtype = grouped_acc_dtype(grads)
    gn = torch.zeros(K, T, dtype=torch.float64, device=device)
    nn = torch.zeros(K, T, dtype=torch.float64, device=device)
    for dtype, idx in group_by_dtype(flat).items():
        sub = [flat[i] for i in idx]
        nblk, numels, blk_t, blk_c = _blocks(sub, device)
        sub_gn = torch.zeros(K, len(idx), dtype=torch.float64, device=device)
        sub_nn = torch.zeros(K, len(idx), dtype=torch.float64, device=device)
        _dots_kernel[(nblk,)](keys[:, idx].contiguous(), K, len(idx), pointer_table(sub, device), numels, blk_t,
                              blk_c, sub_gn, sub_nn, DTYPE=TL_STORAGE[dtype], BLOCK=BLOCK)
        gn[:, idx] = sub_gn
        nn[:, idx] = sub_nn
    scale = (1.0 / (nn.sqrt() + 1e-12)).to(torch.float32).to(torch.float64)  # the stream's rounded scale
    return (gn * scale).sum(dim=1).to(out_dtype)


def orthograd_(params, grads, chunk=1024):
    device = params[0].device
    for dtype, idx in group_by_dtype(params).items():
        ws = [params[i] for i in idx]
        gs = [grads[i] for i in idx]
        chunks = [(j, s) for j, w in enumerate(ws) for s in range(0, max(w.numel(), 1), chunk)]
        tabs = (pointer_table(ws, device), pointer_table(gs, device), int_table((w.numel() for w in ws), device),
                int_table((c[0] for c in chunks), device), int_table((c[1] for c in chunks), device))
        sums = torch.zeros(len(ws), 3, dtype=torch.float64, device=device)
        _ortho_sums_kernel[(len(chunks),)](*tabs, sums, DTYPE=TL_STORAGE[dtype], CHUNK=chunk)
        wg, ww, gg = sums.unbind(1)
        coef = wg / (ww + 1e-30)
        perp2 = (gg - 2 * coef * wg + coef * coef * ww).clamp_min(0)
        scale = gg.sqrt() / (perp2.sqrt() + 1e-30)
        _ortho_write_kernel[(len(chunks),)](*tabs, coef, scale, DTYPE=TL_STORAGE[dtype], CHUNK=chunk)


def shard_normals(out, keys, offsets):
    device = out[0].device
    blocks = [(i, c) for i, (o, off) in enumerate(zip(out, offsets))
              for c in range(off // 4, max((off + o.numel() + 3) // 4, off // 4 + 1), BLOCK)]
    sums = torch.zeros(len(out), dtype=torch.float64, device=device)
    _shard_normals_kernel[(len(blocks),)](keys.to(device), int_table(offsets, device),
                                          int_table((o.numel() for o in out), device),
                                          int_table((b[0] for b in blocks), device),
                                          int_table((b[1] for b in blocks), device), pointer_table(out, device), sums,
                                          BLOCK=BLOCK)
    return sums

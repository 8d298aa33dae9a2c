"""Triton kernels of the spectral family: grouped sums of squares and grouped power iteration. One launch walks
every tensor of a dtype group through the cached launch plan (stabkernels/_launch_plan.py); every reduction runs
in a fixed order (per-program partials, then one ordered pass), so sigma, the norms and u, v are the same bits on
every run and every rank."""
import torch
import triton
import triton.language as tl

from .. import _launch_plan as plan
from .._checks import acc_dtype, grouped_acc_dtype
from ._common import TL_STORAGE, div_ieee, in_order, segment_sums, sqrt_ieee, tl_acc

# --------------------------------------------------------------------------------------------------
# sq_norms


@triton.jit
def _sq_norms_kernel(ptrs, numels, chunk_tensor, chunk_start, partials,
                     DTYPE: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    t = tl.load(chunk_tensor + c)
    start = tl.load(chunk_start + c)
    n = tl.load(numels + t)
    p = tl.load(ptrs + t).to(tl.pointer_type(DTYPE))
    acc = tl.zeros([BLOCK], ACC)
    for off in range(0, CHUNK, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        v = tl.load(p + idx, mask=idx < n, other=0.0).to(ACC)
        acc += v * v
    tl.store(partials + c, tl.sum(acc, axis=0))


def sq_norms(tensors, chunk: int = 8192, block: int = 1024):
    device = tensors[0].device
    out_dtype = grouped_acc_dtype(tensors)
    flat = [t if t.is_contiguous() else t.contiguous() for t in tensors]  # keeps copies alive during the launch
    groups = plan.layout(flat, chunk)
    with plan.device_guard(device):
        sums = []
        for g in groups:
            partials = torch.empty(g.num_chunks, dtype=acc_dtype(g.dtype), device=device)
            _sq_norms_kernel[(g.num_chunks,)](plan.addresses(flat, g), g.numels, g.chunk_tensor, g.chunk_start,
                                              partials, DTYPE=TL_STORAGE[g.dtype], ACC=tl_acc(g.dtype), CHUNK=chunk,
                                              BLOCK=min(block, chunk))
            sums.append(segment_sums(partials, g).to(out_dtype))
        return in_order(groups, sums)


# --------------------------------------------------------------------------------------------------
# power iteration


@triton.jit
def _pi_pass_kernel(w_ptrs, v_ptrs, ms, ns, s0s, s1s, x_offs, yp_offs, active, blk_mat, blk_row, x_buf, yp_buf,
                    DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # One block of rows of one matrix: x_b = W_b v, then this block's part of y = W^T x, W_b^T x_b, into its own
    # row of the partials (the row block is re-read from cache, not from memory); the finish kernel adds the
    # blocks' parts in order. Extra bytes: n numbers per BLOCK_M rows, 1/BLOCK_M of the matrix in the math type.
    pid = tl.program_id(0)
    i = tl.load(blk_mat + pid)
    r0 = tl.load(blk_row + pid)
    m = tl.load(ms + i)
    n = tl.load(ns + i)
    s0 = tl.load(s0s + i)
    s1 = tl.load(s1s + i)
    on = tl.load(active + i) != 0
    w = tl.load(w_ptrs + i).to(tl.pointer_type(DTYPE))
    v = tl.load(v_ptrs + i).to(tl.pointer_type(ACC))
    rows = r0 + tl.arange(0, BLOCK_M).to(tl.int64)
    rmask = (rows < m) & on
    x = tl.zeros([BLOCK_M], ACC)
    for c0 in range(0, n, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
        cmask = cols < n
        tile = tl.load(w + rows[:, None] * s0 + cols[None, :] * s1, mask=rmask[:, None] & cmask[None, :],
                       other=0.0).to(ACC)
        vv = tl.load(v + cols, mask=cmask & on, other=0.0)
        x += tl.sum(tile * vv[None, :], axis=1)
    tl.store(x_buf + tl.load(x_offs + i) + rows, x, mask=rmask)
    yp = yp_buf + tl.load(yp_offs + i) + (r0 // BLOCK_M) * n
    for c0 in range(0, n, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
        cmask = cols < n
        tile = tl.load(w + rows[:, None] * s0 + cols[None, :] * s1, mask=rmask[:, None] & cmask[None, :],
                       other=0.0).to(ACC)
        tl.store(yp + cols, tl.sum(tile * x[:, None], axis=0), mask=cmask & on)


@triton.jit
def _pi_finish_kernel(u_ptrs, v_ptrs, ms, ns, x_offs, y_offs, yp_offs, active, x_buf, y_buf, yp_buf, sigma_ptr, eps,
                      ACC: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr):
    # Per matrix: y = the row blocks' parts added in order; sigma = |y| / |x|, u = x / |x|, v = y / |y|; a zero
    # matrix gives sigma 0 and a non-finite one NaN, both leaving u, v unchanged and the matrix inactive for
    # later iterations.
    i = tl.program_id(0)
    if tl.load(active + i) != 0:
        m = tl.load(ms + i)
        n = tl.load(ns + i)
        xo = tl.load(x_offs + i)
        yo = tl.load(y_offs + i)
        ypo = tl.load(yp_offs + i)
        blocks = (m + BLOCK_M - 1) // BLOCK_M
        sx = tl.zeros([BLOCK], ACC)
        for c0 in range(0, m, BLOCK):
            idx = c0 + tl.arange(0, BLOCK)
            xv = tl.load(x_buf + xo + idx, mask=idx < m, other=0.0)
            sx += xv * xv
        sy = tl.zeros([BLOCK], ACC)
        for c0 in range(0, n, BLOCK):
            idx = c0 + tl.arange(0, BLOCK)
            yv = tl.zeros([BLOCK], ACC)
            for b in range(0, blocks):
                yv += tl.load(yp_buf + ypo + b * n + idx, mask=idx < n, other=0.0)
            tl.store(y_buf + yo + idx, yv, mask=idx < n)
            sy += yv * yv
        nx = sqrt_ieee(tl.sum(sx, axis=0), ACC)
        ny = sqrt_ieee(tl.sum(sy, axis=0), ACC)
        finite = (nx == nx) & (ny == ny) & (nx < float("inf")) & (ny < float("inf"))
        if finite:
            if (nx > eps) & (ny > 0):
                u = tl.load(u_ptrs + i).to(tl.pointer_type(ACC))
                v = tl.load(v_ptrs + i).to(tl.pointer_type(ACC))
                for c0 in range(0, m, BLOCK):
                    idx = c0 + tl.arange(0, BLOCK)
                    xv = tl.load(x_buf + xo + idx, mask=idx < m, other=0.0)
                    tl.store(u + idx, div_ieee(xv, nx, ACC), mask=idx < m)
                for c0 in range(0, n, BLOCK):
                    idx = c0 + tl.arange(0, BLOCK)
                    yv = tl.load(y_buf + yo + idx, mask=idx < n, other=0.0)
                    tl.store(v + idx, div_ieee(yv, ny, ACC), mask=idx < n)
                tl.store(sigma_ptr + i, div_ieee(ny, nx, ACC))
            else:
                tl.store(sigma_ptr + i, 0.0)
                tl.store(active + i, 0)
        else:
            tl.store(sigma_ptr + i, float("nan"))
            tl.store(active + i, 0)


def _pi_tables(W, g, block_m):
    """Per-matrix shape tables and buffer offsets of one dtype group (cached with its layout)."""
    ms = [w.shape[0] for w in W]
    ns = [w.shape[1] for w in W]
    blocks = [-(-m // block_m) for m in ms]
    offsets = lambda sizes: [sum(sizes[:j]) for j in range(len(sizes))]  # noqa: E731
    device = g.index.device
    up = lambda values: plan.upload(values, device)  # noqa: E731
    return dict(ns=up(ns), s0s=up([w.stride(0) for w in W]), s1s=up([w.stride(1) for w in W]),
                x_offs=up(offsets(ms)), y_offs=up(offsets(ns)),
                yp_offs=up(offsets([b * n for b, n in zip(blocks, ns)])),
                x_size=sum(ms), y_size=sum(ns), yp_size=sum(b * n for b, n in zip(blocks, ns)))


def power_iteration_(mats, us, vs, iters, eps, block_m: int = 64, block_n: int | None = None, block: int = 256):
    """block_m rows per program (the partial y's add n numbers per block_m rows: 2/64 of an fp32 matrix's bytes, 3%
    of its read); block_n columns per tile: 64, or 32 for float64, whose 64 x 64 tile spilled 360-400 bytes on
    sm_90/sm_100 (gpu-static-check)."""
    device = mats[0].device
    out_dtype = grouped_acc_dtype(mats)
    groups = plan.layout(mats, block_m, sizes=[w.shape[0] for w in mats])  # programs: row blocks
    with plan.device_guard(device):
        sigmas = []
        for g in groups:
            W = [mats[i] for i in g.members]
            acc = acc_dtype(g.dtype)
            bn = block_n or (32 if acc == torch.float64 else 64)
            key = ("power_iteration", device, block_m) + tuple((tuple(w.shape), tuple(w.stride())) for w in W)
            t = plan.cached(key, lambda: _pi_tables(W, g, block_m))
            w_ptrs, u_ptrs, v_ptrs = plan.addresses(mats, g), plan.addresses(us, g), plan.addresses(vs, g)
            active = torch.ones(g.size, dtype=torch.int32, device=device)
            x_buf = torch.empty(t["x_size"], dtype=acc, device=device)
            y_buf = torch.empty(t["y_size"], dtype=acc, device=device)
            yp_buf = torch.empty(t["yp_size"], dtype=acc, device=device)
            sig = torch.zeros(g.size, dtype=acc, device=device)
            for _ in range(iters):
                _pi_pass_kernel[(g.num_chunks,)](w_ptrs, v_ptrs, g.numels, t["ns"], t["s0s"], t["s1s"], t["x_offs"],
                                                 t["yp_offs"], active, g.chunk_tensor, g.chunk_start, x_buf, yp_buf,
                                                 DTYPE=TL_STORAGE[g.dtype], ACC=tl_acc(g.dtype), BLOCK_M=block_m,
                                                 BLOCK_N=bn)
                _pi_finish_kernel[(g.size,)](u_ptrs, v_ptrs, g.numels, t["ns"], t["x_offs"], t["y_offs"],
                                             t["yp_offs"], active, x_buf, y_buf, yp_buf, sig, eps, ACC=tl_acc(g.dtype),
                                             BLOCK=block, BLOCK_M=block_m)
            sigmas.append(sig.to(out_dtype))
        return in_order(groups, sigmas)

"""Triton kernels of the spectral family: grouped sums of squares and grouped power iteration. One launch
walks every tensor of a dtype group through pointer and shape tables."""
import torch
import triton
import triton.language as tl

from .._checks import acc_dtype, grouped_acc_dtype
from ._common import TL_STORAGE, group_by_dtype, int_table, pointer_table, tl_acc



# --------------------------------------------------------------------------------------------------
# sq_norms


@triton.jit
def _sq_norms_kernel(ptrs, numels, chunk_tensor, chunk_start, out_ptr,
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
    tl.atomic_add(out_ptr + t, tl.sum(acc, axis=0))


def sq_norms(tensors, chunk: int = 8192, block: int = 1024):
    device = tensors[0].device
    out_dtype = grouped_acc_dtype(tensors)
    out = torch.zeros(len(tensors), dtype=out_dtype, device=device)
    for dtype, idx in group_by_dtype(tensors).items():
        flat = [tensors[i].contiguous() for i in idx]  # keeps copies alive during the launch
        acc = acc_dtype(dtype)
        part = torch.zeros(len(idx), dtype=acc, device=device)
        chunks = [(j, s) for j, t in enumerate(flat) for s in range(0, max(t.numel(), 1), chunk)]
        _sq_norms_kernel[(len(chunks),)](
            pointer_table(flat, device), int_table((t.numel() for t in flat), device),
            int_table((c[0] for c in chunks), device), int_table((c[1] for c in chunks), device), part,
            DTYPE=TL_STORAGE[dtype], ACC=tl_acc(dtype), CHUNK=chunk, BLOCK=min(block, chunk))
        out[idx] = part.to(out_dtype)
    return out


# --------------------------------------------------------------------------------------------------
# power iteration


@triton.jit
def _pi_pass_kernel(w_ptrs, v_ptrs, ms, ns, s0s, s1s, x_offs, y_offs, active, blk_mat, blk_row, x_buf, y_buf,
                    DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # One block of rows of one matrix: x_b = W_b v, then y += W_b^T x_b (the row block is re-read from
    # cache, not from memory; y is accumulated across blocks with atomics).
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
    y_off = tl.load(y_offs + i)
    for c0 in range(0, n, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
        cmask = cols < n
        tile = tl.load(w + rows[:, None] * s0 + cols[None, :] * s1, mask=rmask[:, None] & cmask[None, :],
                       other=0.0).to(ACC)
        tl.atomic_add(y_buf + y_off + cols, tl.sum(tile * x[:, None], axis=0), mask=cmask & on)


@triton.jit
def _pi_finish_kernel(u_ptrs, v_ptrs, ms, ns, x_offs, y_offs, active, x_buf, y_buf, sigma_ptr, eps,
                      ACC: tl.constexpr, BLOCK: tl.constexpr):
    # Per matrix: sigma = |y| / |x|, u = x / |x|, v = y / |y|; a zero matrix gives sigma 0 and a
    # non-finite one NaN, both leaving u, v unchanged and the matrix inactive for later iterations.
    i = tl.program_id(0)
    if tl.load(active + i) != 0:
        m = tl.load(ms + i)
        n = tl.load(ns + i)
        xo = tl.load(x_offs + i)
        yo = tl.load(y_offs + i)
        sx = tl.zeros([BLOCK], ACC)
        for c0 in range(0, m, BLOCK):
            idx = c0 + tl.arange(0, BLOCK)
            xv = tl.load(x_buf + xo + idx, mask=idx < m, other=0.0)
            sx += xv * xv
        sy = tl.zeros([BLOCK], ACC)
        for c0 in range(0, n, BLOCK):
            idx = c0 + tl.arange(0, BLOCK)
            yv = tl.load(y_buf + yo + idx, mask=idx < n, other=0.0)
            sy += yv * yv
        nx = tl.sqrt(tl.sum(sx, axis=0))
        ny = tl.sqrt(tl.sum(sy, axis=0))
        finite = (nx == nx) & (ny == ny) & (nx < float("inf")) & (ny < float("inf"))
        if finite:
            if (nx > eps) & (ny > 0):
                u = tl.load(u_ptrs + i).to(tl.pointer_type(ACC))
                v = tl.load(v_ptrs + i).to(tl.pointer_type(ACC))
                for c0 in range(0, m, BLOCK):
                    idx = c0 + tl.arange(0, BLOCK)
                    tl.store(u + idx, tl.load(x_buf + xo + idx, mask=idx < m, other=0.0) / nx, mask=idx < m)
                for c0 in range(0, n, BLOCK):
                    idx = c0 + tl.arange(0, BLOCK)
                    tl.store(v + idx, tl.load(y_buf + yo + idx, mask=idx < n, other=0.0) / ny, mask=idx < n)
                tl.store(sigma_ptr + i, ny / nx)
            else:
                tl.store(sigma_ptr + i, 0.0)
                tl.store(active + i, 0)
        else:
            tl.store(sigma_ptr + i, float("nan"))
            tl.store(active + i, 0)


def power_iteration_(mats, us, vs, iters, eps, block_m: int = 16, block_n: int = 128, block: int = 256):
    device = mats[0].device
    out_dtype = grouped_acc_dtype(mats)
    sigma = torch.zeros(len(mats), dtype=out_dtype, device=device)
    for dtype, idx in group_by_dtype(mats).items():
        W = [mats[i] for i in idx]
        acc = acc_dtype(dtype)
        ms = [w.shape[0] for w in W]
        ns = [w.shape[1] for w in W]
        x_offs = [sum(ms[:j]) for j in range(len(W))]
        y_offs = [sum(ns[:j]) for j in range(len(W))]
        blocks = [(j, r) for j in range(len(W)) for r in range(0, ms[j], block_m)]
        t = dict(ms=int_table(ms, device), ns=int_table(ns, device), x_offs=int_table(x_offs, device),
                 y_offs=int_table(y_offs, device))
        w_ptrs = pointer_table(W, device)
        u_ptrs = pointer_table([us[i] for i in idx], device)
        v_ptrs = pointer_table([vs[i] for i in idx], device)
        s0s = int_table((w.stride(0) for w in W), device)
        s1s = int_table((w.stride(1) for w in W), device)
        blk_mat = int_table((b[0] for b in blocks), device)
        blk_row = int_table((b[1] for b in blocks), device)
        active = torch.ones(len(W), dtype=torch.int32, device=device)
        x_buf = torch.empty(sum(ms), dtype=acc, device=device)
        y_buf = torch.empty(sum(ns), dtype=acc, device=device)
        sig = torch.zeros(len(W), dtype=acc, device=device)
        for _ in range(iters):
            y_buf.zero_()
            _pi_pass_kernel[(len(blocks),)](w_ptrs, v_ptrs, t["ms"], t["ns"], s0s, s1s, t["x_offs"], t["y_offs"],
                                            active, blk_mat, blk_row, x_buf, y_buf, DTYPE=TL_STORAGE[dtype],
                                            ACC=tl_acc(dtype), BLOCK_M=block_m, BLOCK_N=block_n)
            _pi_finish_kernel[(len(W),)](u_ptrs, v_ptrs, t["ms"], t["ns"], t["x_offs"], t["y_offs"], active,
                                         x_buf, y_buf, sig, eps, ACC=tl_acc(dtype), BLOCK=block)
        sigma[idx] = sig.to(out_dtype)
    return sigma

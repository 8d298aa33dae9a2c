"""Triton kernels of the fused optimizer updates (see stabkernels/update.py). One launch per storage dtype
walks every parameter in chunks through pointer tables. Scalar hyper-parameters travel in a float64 tensor
(Triton passes Python floats as fp32, too coarse for fp64 parameters) and the step scale / lr is read from a
device tensor, so no host synchronisation is needed."""
import math

import torch
import triton
import triton.language as tl

from .._checks import acc_dtype, grouped_acc_dtype
from ._common import TL_STORAGE, chunk_range, group_by_dtype, int_table, pointer_table, tl_acc

CHUNK = 4096



@triton.jit
def _ptr(table, i, DT: tl.constexpr):
    return tl.load(table + i).to(tl.pointer_type(DT))


@triton.jit
def _adam_kernel(p_tab, g_tab, m_tab, v_tab, vm_tab, u_tab, numels, chunk_tensor, chunk_start, consts, scale_ptr,
                 sums, DTYPE: tl.constexpr, ACC: tl.constexpr, DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr,
                 MAXIMIZE: tl.constexpr, APPLY: tl.constexpr, WRITE_U: tl.constexpr, CHUNK: tl.constexpr,
                 BLOCK: tl.constexpr):
    i, start, n = chunk_range(chunk_tensor, chunk_start, numels)
    lr = tl.load(consts + 0).to(ACC)
    beta1 = tl.load(consts + 1).to(ACC)
    beta2 = tl.load(consts + 2).to(ACC)
    eps = tl.load(consts + 3).to(ACC)
    wd = tl.load(consts + 4).to(ACC)
    bc1 = tl.load(consts + 5).to(ACC)
    bc2_sqrt = tl.load(consts + 6).to(ACC)
    step_lr = lr * tl.load(scale_ptr).to(ACC)
    p_ptr = _ptr(p_tab, i, DTYPE)
    g_ptr = _ptr(g_tab, i, DTYPE)
    m_ptr = _ptr(m_tab, i, DTYPE)
    v_ptr = _ptr(v_tab, i, DTYPE)
    acc = tl.zeros([BLOCK], ACC)
    for off in range(0, CHUNK, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        mask = idx < n
        p = tl.load(p_ptr + idx, mask=mask, other=0.0).to(ACC)
        g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(ACC)
        m = tl.load(m_ptr + idx, mask=mask, other=0.0).to(ACC)
        v = tl.load(v_ptr + idx, mask=mask, other=0.0).to(ACC)
        if MAXIMIZE:
            g = -g
        if APPLY and DECOUPLED:
            p = p * (1 - lr * wd)
        if not DECOUPLED:
            g = g + p * wd
        m = m + (g - m) * (1 - beta1)
        v = v * beta2 + g * (1 - beta2) * g
        vh = v
        if AMSGRAD:
            vm_ptr = _ptr(vm_tab, i, DTYPE)
            vh = tl.maximum(tl.load(vm_ptr + idx, mask=mask, other=0.0).to(ACC), v)
            tl.store(vm_ptr + idx, vh.to(DTYPE), mask=mask)
        u = (m / bc1) / (tl.sqrt(vh) / bc2_sqrt + eps)
        tl.store(m_ptr + idx, m.to(DTYPE), mask=mask)
        tl.store(v_ptr + idx, v.to(DTYPE), mask=mask)
        if WRITE_U:
            tl.store(_ptr(u_tab, i, ACC) + idx, u, mask=mask)
        if APPLY:
            tl.store(p_ptr + idx, (p - step_lr * u).to(DTYPE), mask=mask)
        acc += tl.where(mask, u * u, 0.0)
    tl.atomic_add(sums + i, tl.sum(acc, axis=0))


@triton.jit
def _sgd_kernel(p_tab, g_tab, b_tab, u_tab, numels, chunk_tensor, chunk_start, consts, scale_ptr, sums,
                DTYPE: tl.constexpr, ACC: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                MAXIMIZE: tl.constexpr, FIRST: tl.constexpr, APPLY: tl.constexpr, WRITE_U: tl.constexpr,
                CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    i, start, n = chunk_range(chunk_tensor, chunk_start, numels)
    lr = tl.load(consts + 0).to(ACC)
    mu = tl.load(consts + 1).to(ACC)
    damp = tl.load(consts + 2).to(ACC)
    wd = tl.load(consts + 3).to(ACC)
    step_lr = lr * tl.load(scale_ptr).to(ACC)
    p_ptr = _ptr(p_tab, i, DTYPE)
    g_ptr = _ptr(g_tab, i, DTYPE)
    acc = tl.zeros([BLOCK], ACC)
    for off in range(0, CHUNK, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        mask = idx < n
        p = tl.load(p_ptr + idx, mask=mask, other=0.0).to(ACC)
        g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(ACC)
        if MAXIMIZE:
            g = -g
        g = g + p * wd
        u = g
        if MOMENTUM:
            b_ptr = _ptr(b_tab, i, DTYPE)
            if FIRST:
                b = g
            else:
                b = tl.load(b_ptr + idx, mask=mask, other=0.0).to(ACC) * mu + g * (1 - damp)
            tl.store(b_ptr + idx, b.to(DTYPE), mask=mask)
            if NESTEROV:
                u = g + b * mu
            else:
                u = b
        if WRITE_U:
            tl.store(_ptr(u_tab, i, ACC) + idx, u, mask=mask)
        if APPLY:
            tl.store(p_ptr + idx, (p - step_lr * u).to(DTYPE), mask=mask)
        acc += tl.where(mask, u * u, 0.0)
    tl.atomic_add(sums + i, tl.sum(acc, axis=0))


@triton.jit
def _apply_kernel(p_tab, u_tab, numels, chunk_tensor, chunk_start, lr_ptr, wd, DTYPE: tl.constexpr,
                  ACC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    i, start, n = chunk_range(chunk_tensor, chunk_start, numels)
    lr = tl.load(lr_ptr).to(ACC)
    decay = 1 - lr * tl.load(wd).to(ACC)
    p_ptr = _ptr(p_tab, i, DTYPE)
    u_ptr = _ptr(u_tab, i, ACC)
    for off in range(0, CHUNK, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        mask = idx < n
        p = tl.load(p_ptr + idx, mask=mask, other=0.0).to(ACC)
        u = tl.load(u_ptr + idx, mask=mask, other=0.0)
        tl.store(p_ptr + idx, (p * decay - lr * u).to(DTYPE), mask=mask)


def _chunk_tables(ts, device):
    chunks = [(j, s) for j, t in enumerate(ts) for s in range(0, max(t.numel(), 1), CHUNK)]
    return (len(chunks), int_table((t.numel() for t in ts), device), int_table((c[0] for c in chunks), device),
            int_table((c[1] for c in chunks), device))


def _launch_grouped(params, launch):
    """Calls launch(dtype, idx, nchunks, numels, chunk_tensor, chunk_start, sums) per dtype group and gathers
    the per-tensor sums."""
    device = params[0].device
    out = torch.zeros(len(params), dtype=grouped_acc_dtype(params), device=device)
    for dtype, idx in group_by_dtype(params).items():
        sums = torch.zeros(len(idx), dtype=acc_dtype(dtype), device=device)
        launch(dtype, idx, *_chunk_tables([params[i] for i in idx], device), sums)
        out[idx] = sums.to(out.dtype)
    return out


def adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, updates, step_scale, lr, beta1, beta2,
               eps, weight_decay, step, decoupled, amsgrad, maximize, apply):
    device = params[0].device
    consts = torch.tensor([lr, beta1, beta2, eps, weight_decay, 1 - beta1 ** step, math.sqrt(1 - beta2 ** step)],
                          dtype=torch.float64, device=device)
    scale = step_scale.to(device=device, dtype=torch.float64).reshape(1)

    def launch(dtype, idx, nchunks, numels, chunk_tensor, chunk_start, sums):
        sel = lambda ts: pointer_table([ts[i] for i in idx], device) if ts else numels  # noqa: E731
        _adam_kernel[(nchunks,)](sel(params), sel(grads), sel(exp_avgs), sel(exp_avg_sqs), sel(max_exp_avg_sqs),
                                 sel(updates), numels, chunk_tensor, chunk_start, consts, scale, sums,
                                 DTYPE=TL_STORAGE[dtype], ACC=tl_acc(dtype), DECOUPLED=decoupled, AMSGRAD=amsgrad,
                                 MAXIMIZE=maximize, APPLY=apply, WRITE_U=bool(updates), CHUNK=CHUNK, BLOCK=1024)

    return _launch_grouped(params, launch)


def sgd_step_(params, grads, momentum_buffers, updates, step_scale, lr, momentum, dampening, weight_decay,
              nesterov, maximize, first, apply):
    device = params[0].device
    consts = torch.tensor([lr, momentum, dampening, weight_decay], dtype=torch.float64, device=device)
    scale = step_scale.to(device=device, dtype=torch.float64).reshape(1)

    def launch(dtype, idx, nchunks, numels, chunk_tensor, chunk_start, sums):
        sel = lambda ts: pointer_table([ts[i] for i in idx], device) if ts else numels  # noqa: E731
        _sgd_kernel[(nchunks,)](sel(params), sel(grads), sel(momentum_buffers), sel(updates), numels, chunk_tensor,
                                chunk_start, consts, scale, sums, DTYPE=TL_STORAGE[dtype], ACC=tl_acc(dtype),
                                MOMENTUM=momentum != 0, NESTEROV=nesterov, MAXIMIZE=maximize, FIRST=first,
                                APPLY=apply, WRITE_U=bool(updates), CHUNK=CHUNK, BLOCK=1024)

    return _launch_grouped(params, launch)


def apply_update_(params, updates, lr, weight_decay):
    device = params[0].device
    lr_t = lr.to(device=device, dtype=torch.float64).reshape(1)
    wd = torch.tensor([weight_decay], dtype=torch.float64, device=device)

    def launch(dtype, idx, nchunks, numels, chunk_tensor, chunk_start, sums):
        _apply_kernel[(nchunks,)](pointer_table([params[i] for i in idx], device),
                                  pointer_table([updates[i] for i in idx], device), numels, chunk_tensor,
                                  chunk_start, lr_t, wd, DTYPE=TL_STORAGE[dtype], ACC=tl_acc(dtype),
                                  CHUNK=CHUNK, BLOCK=1024)

    _launch_grouped(params, launch)

"""Triton kernels of the fused optimizer updates (see stabkernels/update.py). One launch per storage dtype walks
every parameter in chunks through the cached launch plan (stabkernels/_launch_plan.py). Nothing is copied from
the host in a step: lr, the step counter and the step scale are read from 0-d device tensors, Adam's bias
corrections are computed from the step counter in the kernel (so a replayed CUDA graph steps on), and the
rarely changing hyper-parameters come from a cached float64 device tensor (Triton passes a Python float as
float32, too coarse for float64 parameters). Per-tensor sum(u^2) is reduced in a fixed order.

The optional skip flag (SPEC 7.1) is read by every program from device memory: a program of a skipped step
writes its zero partials and returns before touching the tensors. Update clipping's statistic (SPEC 7.2) is a
second per-program partial of the Adam pass; the clipped step (clip_stats 3) is that pass alone, then the step
whose programs form each tensor's clipped rate from its sums (two launches and their reductions per dtype
group, nothing between them). apply_update_ takes one lr or one per tensor (indexed by the tensor's position
in the list, the group's cached index table)."""
import torch
import triton
import triton.language as tl

from .. import _launch_plan as plan
from .._checks import acc_dtype, grouped_acc_dtype
from ._common import TL_STORAGE, chunk_range, div_ieee, in_order, segment_sums, smallest_normal, sqrt_ieee, tl_acc

CHUNK = 4096
BLOCK = 1024
# The Adam kernel's block for float64 and 16-bit storage: at 1024, float64 (amsgrad, apply, u and update
# clipping's second accumulator) needed 255 registers and spilled 144-168 bytes on sm_90, and 16-bit storage with
# amsgrad or update clipping spilled 8-16 bytes at sm_100's 128 registers (tools/gpu_static_check.py, triton 3.6).
# Half the block halves the values each thread holds. By dtype only, never by variant: the per-chunk sums' order
# follows the block, and sum(u^2) must not change with clip_stats (RadiusAdamW(update_clip) with no clip active
# keeps tau bit for bit).
BLOCK_NARROW = 512


def _adam_block(dtype: torch.dtype) -> int:
    return BLOCK if dtype.itemsize == 4 else BLOCK_NARROW


@triton.jit
def _ptr(table, i, DT: tl.constexpr):
    return tl.load(table + i).to(tl.pointer_type(DT))


@triton.jit
def _bias_correction(beta, step):
    """1 - beta^step in float64, step a float64 count >= 1 (beta 0 gives 1)."""
    return 1 - tl.exp(step * tl.log(tl.maximum(beta, 1e-300)))


@triton.jit
def _adam_kernel(p_tab, g_tab, m_tab, v_tab, vm_tab, u_tab, numels, chunk_tensor, chunk_start, index, consts, lr_ptr,
                 step_ptr, scale_ptr, skip_ptr, clip_sums, partials, DTYPE: tl.constexpr, ACC: tl.constexpr,
                 DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, APPLY: tl.constexpr,
                 WRITE_U: tl.constexpr, EPS_RAW: tl.constexpr, HAS_SKIP: tl.constexpr, CLIP: tl.constexpr,
                 ONLY: tl.constexpr, READ_P: tl.constexpr, LR_PER_TENSOR: tl.constexpr, CLIP_LR: tl.constexpr,
                 PARTIALS_STRIDE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    # partials: (programs,) sum(u^2), or with CLIP (programs, 2): sum(u^2), sum(g^2 / max(v_hat, eps^2)); ONLY
    # (with CLIP): the second alone, from g and v (max v, p for coupled decay) read, nothing written. CLIP_LR:
    # update clipping's rate lr / max(1, sqrt(s / numel)), s = clip_sums[member, 1] (an ONLY pass's sums over
    # the group, (members, 2)), formed by every program as update.clip_lrs forms it. Without CLIP the partial
    # goes to partials[program * PARTIALS_STRIDE] (2: column 0 of an ONLY pass's partials)
    if HAS_SKIP:
        if tl.load(skip_ptr) != 0:  # a skipped step: zero partials, nothing else written
            if CLIP:
                tl.store(partials + tl.program_id(0) * 2 + tl.arange(0, 2), tl.zeros([2], ACC))
            else:
                tl.store(partials + tl.program_id(0) * PARTIALS_STRIDE, tl.zeros([1], ACC).sum())
            return
    i, start, n = chunk_range(chunk_tensor, chunk_start, numels)
    # the constants in float64, each rounded once to the math type (as the CPU kernel does)
    beta1 = tl.load(consts + 0)
    beta2 = tl.load(consts + 1)
    eps = tl.load(consts + 2)
    wd = tl.load(consts + 3)
    if LR_PER_TENSOR:  # lr[position of the tensor in the list]
        lr = tl.load(lr_ptr + tl.load(index + i)).to(tl.float64)
    else:
        lr = tl.load(lr_ptr).to(tl.float64)
    if CLIP_LR:  # float64: IEEE division and square root on a GPU
        rms = tl.sqrt(tl.load(clip_sums + i * 2 + 1).to(tl.float64) / tl.load(numels + i).to(tl.float64))
        lr = lr / tl.maximum(rms, 1.0, propagate_nan=tl.PropagateNan.ALL)  # max(1, rms), NaN kept (clamp_min)
    step = tl.load(step_ptr).to(tl.float64)
    bc1 = _bias_correction(beta1, step)
    bc2 = _bias_correction(beta2, step)
    bc2_sqrt = tl.sqrt(bc2)
    # update clipping's eps^2, of the eps given (also with EPS_RAW), at least the smallest normal number: a tiny eps
    # (1e-25) squares to 0 in float32, and a 0 gradient over a 0 v would make the RMS 0 / 0
    eps2 = tl.maximum((eps * eps).to(ACC), smallest_normal(ACC))
    inv_bc2 = (1 / bc2).to(ACC)
    if EPS_RAW:  # eps on the uncorrected sqrt(v)
        eps = eps / bc2_sqrt
    one_minus_beta1 = (1 - beta1).to(ACC)
    one_minus_beta2 = (1 - beta2).to(ACC)
    b2 = beta2.to(ACC)
    e = eps.to(ACC)
    w = wd.to(ACC)
    c1 = bc1.to(ACC)
    c2 = bc2_sqrt.to(ACC)
    step_lr = (lr * tl.load(scale_ptr).to(tl.float64)).to(ACC)
    decay = (1 - lr * wd).to(ACC)
    p_ptr = _ptr(p_tab, i, DTYPE)
    g_ptr = _ptr(g_tab, i, DTYPE)
    m_ptr = _ptr(m_tab, i, DTYPE)
    v_ptr = _ptr(v_tab, i, DTYPE)
    acc = tl.zeros([BLOCK], ACC)
    acc_clip = tl.zeros([BLOCK], ACC)
    for off in range(0, CHUNK, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        mask = idx < n
        g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(ACC)
        v = tl.load(v_ptr + idx, mask=mask, other=0.0).to(ACC)
        if MAXIMIZE:
            g = -g
        if READ_P:  # p is read only when the step needs it: applied, or Adam's L2 decay on g
            p = tl.load(p_ptr + idx, mask=mask, other=0.0).to(ACC)
            if APPLY and DECOUPLED:
                p = p * decay
            if not DECOUPLED:
                g = g + p * w
        v = v * b2 + g * one_minus_beta2 * g
        vh = v
        if AMSGRAD:
            vm_ptr = _ptr(vm_tab, i, DTYPE)
            vh = tl.maximum(tl.load(vm_ptr + idx, mask=mask, other=0.0).to(ACC), v)
            if not ONLY:
                tl.store(vm_ptr + idx, vh.to(DTYPE), mask=mask)
        if not ONLY:
            m = tl.load(m_ptr + idx, mask=mask, other=0.0).to(ACC)
            m = m + (g - m) * one_minus_beta1
            u = div_ieee(div_ieee(m, c1, ACC), div_ieee(sqrt_ieee(vh, ACC), c2, ACC) + e, ACC)
            tl.store(m_ptr + idx, m.to(DTYPE), mask=mask)
            tl.store(v_ptr + idx, v.to(DTYPE), mask=mask)
            if WRITE_U:
                tl.store(_ptr(u_tab, i, ACC) + idx, u, mask=mask)
            if APPLY:
                tl.store(p_ptr + idx, (p - step_lr * u).to(DTYPE), mask=mask)
            acc += tl.where(mask, u * u, 0.0)
        if CLIP:
            vc = tl.maximum(vh * inv_bc2, eps2, propagate_nan=tl.PropagateNan.ALL)
            acc_clip += tl.where(mask, div_ieee(g * g, vc, ACC), 0.0)
    if CLIP:
        two = tl.arange(0, 2)
        tl.store(partials + tl.program_id(0) * 2 + two,
                 tl.where(two == 0, tl.sum(acc, axis=0), tl.sum(acc_clip, axis=0)))
    else:
        tl.store(partials + tl.program_id(0) * PARTIALS_STRIDE, tl.sum(acc, axis=0))


@triton.jit
def _sgd_kernel(p_tab, g_tab, b_tab, u_tab, numels, chunk_tensor, chunk_start, consts, lr_ptr, scale_ptr, skip_ptr,
                partials, DTYPE: tl.constexpr, ACC: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                MAXIMIZE: tl.constexpr, FIRST: tl.constexpr, APPLY: tl.constexpr, WRITE_U: tl.constexpr,
                HAS_SKIP: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    if HAS_SKIP:
        if tl.load(skip_ptr) != 0:  # a skipped step: a zero partial, nothing else written
            tl.store(partials + tl.program_id(0), tl.zeros([1], ACC).sum())
            return
    i, start, n = chunk_range(chunk_tensor, chunk_start, numels)
    mu = tl.load(consts + 0).to(ACC)
    one_minus_damp = (1 - tl.load(consts + 1)).to(ACC)
    wd = tl.load(consts + 2).to(ACC)
    step_lr = (tl.load(lr_ptr).to(tl.float64) * tl.load(scale_ptr).to(tl.float64)).to(ACC)
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
                b = tl.load(b_ptr + idx, mask=mask, other=0.0).to(ACC) * mu + g * one_minus_damp
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
    tl.store(partials + tl.program_id(0), tl.sum(acc, axis=0))


@triton.jit
def _apply_kernel(p_tab, u_tab, numels, chunk_tensor, chunk_start, index, lr_ptr, scale_ptr, skip_ptr, consts,
                  DTYPE: tl.constexpr, ACC: tl.constexpr, LR_PER_TENSOR: tl.constexpr, HAS_SCALE: tl.constexpr,
                  HAS_SKIP: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    if HAS_SKIP:
        if tl.load(skip_ptr) != 0:
            return
    i, start, n = chunk_range(chunk_tensor, chunk_start, numels)
    if LR_PER_TENSOR:  # lr[position of the tensor in the list]
        lr64 = tl.load(lr_ptr + tl.load(index + i)).to(tl.float64)
    else:
        lr64 = tl.load(lr_ptr).to(tl.float64)
    if HAS_SCALE:
        step_lr = (lr64 * tl.load(scale_ptr).to(tl.float64)).to(ACC)
    else:
        step_lr = lr64.to(ACC)
    decay = (1 - lr64 * tl.load(consts)).to(ACC)
    p_ptr = _ptr(p_tab, i, DTYPE)
    u_ptr = _ptr(u_tab, i, ACC)
    for off in range(0, CHUNK, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        mask = idx < n
        p = tl.load(p_ptr + idx, mask=mask, other=0.0).to(ACC)
        u = tl.load(u_ptr + idx, mask=mask, other=0.0)
        tl.store(p_ptr + idx, (p * decay - step_lr * u).to(DTYPE), mask=mask)


def _grouped(params, launch, width: int = 1):
    """Runs ``launch(group, tables, partials)`` per dtype group (``tables(list)``: the list's address table for
    the group; partials (programs,) or (programs, width)) and returns the per-tensor sums of the programs'
    partials in the order of ``params``: (T,), or (width, T)."""
    device = params[0].device
    out_dtype = grouped_acc_dtype(params)
    groups = plan.layout(params, CHUNK)
    shape = () if width == 1 else (width,)
    with plan.device_guard(device):
        sums = []
        for g in groups:
            partials = torch.empty((g.num_chunks,) + shape, dtype=acc_dtype(g.dtype), device=device)
            launch(g, lambda ts: plan.addresses(ts, g) if ts else g.numels, partials)
            sums.append(segment_sums(partials, g).to(out_dtype))
        out = in_order(groups, sums)
        return out if width == 1 else out.t().contiguous()


def adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, updates, step_scale, lr, step, beta1, beta2,
               eps, weight_decay, decoupled, amsgrad, maximize, apply, eps_raw, skip, clip_stats):
    consts = plan.constants((beta1, beta2, eps, weight_decay), params[0].device)

    def run(g, tab, partials, only, clip, clip_sums=None):
        apply_now = apply and not only
        read_p = apply_now or (not decoupled and weight_decay != 0)
        _adam_kernel[(g.num_chunks,)](tab(params), tab(grads), tab(exp_avgs), tab(exp_avg_sqs), tab(max_exp_avg_sqs),
                                      tab(updates), g.numels, g.chunk_tensor, g.chunk_start, g.index, consts, lr,
                                      step, step_scale, lr if skip is None else skip,
                                      partials if clip_sums is None else clip_sums, partials,
                                      DTYPE=TL_STORAGE[g.dtype], ACC=tl_acc(g.dtype), DECOUPLED=decoupled,
                                      AMSGRAD=amsgrad, MAXIMIZE=maximize, APPLY=apply_now,
                                      WRITE_U=bool(updates) and not only, EPS_RAW=eps_raw,
                                      HAS_SKIP=skip is not None, CLIP=clip, ONLY=only, READ_P=read_p,
                                      LR_PER_TENSOR=lr.numel() != 1, CLIP_LR=clip_sums is not None,
                                      PARTIALS_STRIDE=partials.shape[-1] if partials.dim() == 2 else 1,
                                      CHUNK=CHUNK, BLOCK=_adam_block(g.dtype))

    def launch(g, tab, partials):
        if clip_stats == 3:  # update clipping's whole step, per group: the statistics pass (partials' column 1,
            # column 0 zeros), then the step at the clipped rates without the statistic, into column 0
            run(g, tab, partials, True, True)
            run(g, tab, partials, False, False, segment_sums(partials, g))
        else:
            run(g, tab, partials, clip_stats == 2, clip_stats != 0)

    return _grouped(params, launch, 2 if clip_stats else 1)


def sgd_step_(params, grads, momentum_buffers, updates, step_scale, lr, momentum, dampening, weight_decay,
              nesterov, maximize, first, apply, skip):
    consts = plan.constants((momentum, dampening, weight_decay), params[0].device)

    def launch(g, tab, partials):
        _sgd_kernel[(g.num_chunks,)](tab(params), tab(grads), tab(momentum_buffers), tab(updates), g.numels,
                                     g.chunk_tensor, g.chunk_start, consts, lr, step_scale,
                                     lr if skip is None else skip, partials, DTYPE=TL_STORAGE[g.dtype],
                                     ACC=tl_acc(g.dtype), MOMENTUM=momentum != 0, NESTEROV=nesterov,
                                     MAXIMIZE=maximize, FIRST=first, APPLY=apply, WRITE_U=bool(updates),
                                     HAS_SKIP=skip is not None, CHUNK=CHUNK, BLOCK=BLOCK)

    return _grouped(params, launch)


def apply_update_(params, updates, lr, weight_decay, step_scale, skip):
    device = params[0].device
    consts = plan.constants((weight_decay,), device)
    with plan.device_guard(device):
        for g in plan.layout(params, CHUNK):
            _apply_kernel[(g.num_chunks,)](plan.addresses(params, g), plan.addresses(updates, g), g.numels,
                                           g.chunk_tensor, g.chunk_start, g.index, lr,
                                           lr if step_scale is None else step_scale, lr if skip is None else skip,
                                           consts, DTYPE=TL_STORAGE[g.dtype], ACC=tl_acc(g.dtype),
                                           LR_PER_TENSOR=lr.numel() != 1, HAS_SCALE=step_scale is not None,
                                           HAS_SKIP=skip is not None, CHUNK=CHUNK, BLOCK=BLOCK)


# n_prev and slot change every step: specialising on them (== 1, divisible by 16) would compile new variants
# during the first window
@triton.jit(do_not_specialize=["n_prev", "slot"])
def _skip_rule_kernel(hist, skipped, loss, grad_norm, keep_out, consts, n_prev, slot, window,
                      ACTIVE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """SkipStep's rule (SPEC 7.1) in one program: per row, mean and unbiased std of the previous n_prev values
    (two passes, float64), this step's value tested against them; then, after a barrier (a full window's column
    ``slot`` is among the values just read, by other threads), the values written into column ``slot``."""
    sigma = tl.load(consts)
    ok = tl.full((), 1, tl.int32)
    if ACTIVE:
        for r in tl.static_range(ROWS):
            if r == 0:
                x = tl.load(loss).to(tl.float64)
            else:
                x = tl.load(grad_norm).to(tl.float64)
            row = hist + r * window
            nf = n_prev.to(tl.float64)
            acc = tl.zeros((BLOCK,), tl.float64)
            for off in range(0, n_prev, BLOCK):
                idx = off + tl.arange(0, BLOCK)
                acc += tl.load(row + idx, mask=idx < n_prev, other=0.0)
            mean = tl.sum(acc, axis=0) / nf
            acc = tl.zeros((BLOCK,), tl.float64)
            for off in range(0, n_prev, BLOCK):
                idx = off + tl.arange(0, BLOCK)
                d = tl.where(idx < n_prev, tl.load(row + idx, mask=idx < n_prev, other=0.0) - mean, 0.0)
                acc += d * d
            std = tl.sqrt(tl.sum(acc, axis=0) / (nf - 1))  # float64: IEEE on a GPU
            ok = ok & (tl.abs(x - mean) / std <= sigma).to(tl.int32)  # NaN fails
        tl.debug_barrier()
    tl.store(hist + slot, tl.load(loss).to(tl.float64))
    if ROWS == 2:
        tl.store(hist + window + slot, tl.load(grad_norm).to(tl.float64))
    tl.store(keep_out, ok != 0)
    tl.store(skipped, tl.load(skipped) + (1 - ok).to(tl.int64))


def skip_rule_(history, skipped, loss, grad_norm, count, warmup, sigma_factor):
    device = history.device
    window = history.shape[1]
    keep = torch.empty((), dtype=torch.bool, device=device)
    with plan.device_guard(device):
        _skip_rule_kernel[(1,)](history, skipped, loss, loss if grad_norm is None else grad_norm, keep,
                                plan.constants((sigma_factor,), device), min(count, window), count % window,
                                window, ACTIVE=count + 1 >= warmup, ROWS=1 if grad_norm is None else 2,
                                BLOCK=min(triton.next_power_of_2(window), 1024), num_warps=1)
    return keep

"""Fused optimizer updates against torch.optim (the ground truth) and the float64 reference, per backend."""
import functools

import pytest
import torch

from stabkernels import update
from stabkernels.update import adam_step_reference, apply_update_reference, sgd_step_reference

from .helpers import DispatchedOps, backend_params

ADAM_BACKENDS = backend_params("adam_step_")
SGD_BACKENDS = backend_params("sgd_step_")
APPLY_BACKENDS = backend_params("apply_update_")
SHAPES = [(37,), (5, 9), (3, 4, 5), (1,)]


def f64(x, device="cpu"):
    """A 0-d float64 tensor: how the wrappers hand lr, step and step_scale to the ops."""
    return torch.full((), float(x), dtype=torch.float64, device=device)


def make_params(device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) for s in SHAPES]


def grads_for(params, step, seed=10):
    g = torch.Generator().manual_seed(seed + step)
    return [torch.randn(p.shape, generator=g, dtype=torch.float64).to(p) for p in params]


ADAM_CONFIGS = [
    dict(cls=torch.optim.AdamW, weight_decay=0.1),
    dict(cls=torch.optim.Adam, weight_decay=0.05),  # coupled L2
    dict(cls=torch.optim.AdamW, weight_decay=0.0, amsgrad=True),
    dict(cls=torch.optim.Adam, weight_decay=0.0, maximize=True, betas=(0.8, 0.99), eps=1e-6),
]


@pytest.mark.parametrize("backend,device", ADAM_BACKENDS)
@pytest.mark.parametrize("cfg", ADAM_CONFIGS, ids=lambda c: f"{c['cls'].__name__}-{'-'.join(k for k in c if k != 'cls')}")
def test_adam_step_matches_torch_optim(backend, device, cfg):
    cfg = dict(cfg)
    cls = cfg.pop("cls")
    ours, theirs = make_params(device), make_params(device)
    opt = cls(theirs, lr=0.01, foreach=False, **cfg)
    m = [torch.zeros_like(p) for p in ours]
    v = [torch.zeros_like(p) for p in ours]
    vmax = [torch.zeros_like(p) for p in ours]
    for step in range(1, 6):
        for p, g in zip(theirs, grads_for(theirs, step)):
            p.grad = g
        opt.step()
        update.adam_step_(ours, grads_for(ours, step), m, v, step=step, lr=0.01,
                          betas=cfg.get("betas", (0.9, 0.999)), eps=cfg.get("eps", 1e-8),
                          weight_decay=cfg["weight_decay"], decoupled=cls is torch.optim.AdamW,
                          amsgrad=cfg.get("amsgrad", False), maximize=cfg.get("maximize", False),
                          max_exp_avg_sqs=vmax, backend=backend)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(m, [opt.state[p]["exp_avg"] for p in theirs]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend,device", ADAM_BACKENDS)
def test_adam_unit_proposal_and_its_norm(backend, device):
    """u is the step torch takes at lr = 1 (AdamW without decay); sums are sum(u^2); p is untouched
    without apply; step_scale multiplies the applied step."""
    ours, ref = make_params(device), make_params(device)
    opt = torch.optim.AdamW(ref, lr=1.0, weight_decay=0.0, foreach=False)
    m = [torch.zeros_like(p) for p in ours]
    v = [torch.zeros_like(p) for p in ours]
    for step in range(1, 4):
        before = [p.clone() for p in ref]
        for p, g in zip(ref, grads_for(ref, step)):
            p.grad = g
        opt.step()
        u = [torch.empty_like(p) for p in ours]
        keep = [p.clone() for p in ours]
        sums = update.adam_step_(ours, grads_for(ours, step), m, v, step=step, lr=1.0, updates=u, apply=False,
                                 backend=backend)
        assert all(torch.equal(a, b) for a, b in zip(keep, ours))
        for uu, b, a in zip(u, before, ref):
            torch.testing.assert_close(uu, b - a, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sums, torch.stack([x.pow(2).sum() for x in u]), rtol=1e-5, atol=0)
        update.apply_update_(ours, u, torch.tensor(1.0, device=device), backend=backend)
    # step_scale: the applied step is lr * scale * u
    p1, p2 = make_params(device), make_params(device)
    z = lambda ps: [torch.zeros_like(p) for p in ps]  # noqa: E731
    g = grads_for(p1, 1)
    update.adam_step_(p1, g, z(p1), z(p1), step=1, lr=0.2, step_scale=torch.tensor(0.25, device=device),
                      backend=backend)
    update.adam_step_(p2, g, z(p2), z(p2), step=1, lr=0.05, backend=backend)
    for a, b in zip(p1, p2):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


SGD_CONFIGS = [
    dict(momentum=0.0),
    dict(momentum=0.9, dampening=0.1, weight_decay=0.01),
    dict(momentum=0.9, nesterov=True),
    dict(momentum=0.5, maximize=True, weight_decay=0.1),
]


@pytest.mark.parametrize("backend,device", SGD_BACKENDS)
@pytest.mark.parametrize("cfg", SGD_CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_sgd_step_matches_torch_optim(backend, device, cfg):
    ours, theirs = make_params(device), make_params(device)
    opt = torch.optim.SGD(theirs, lr=0.05, foreach=False, **cfg)
    bufs = [torch.zeros_like(p) for p in ours]
    for step in range(1, 5):
        for p, g in zip(theirs, grads_for(theirs, step)):
            p.grad = g
        opt.step()
        update.sgd_step_(ours, grads_for(ours, step), bufs, lr=0.05, first=step == 1, backend=backend, **cfg)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", ADAM_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_adam_step_dtypes_against_float64_reference(backend, device, dtype):
    ours = make_params(device, dtype)
    ref = [p.double().clone() for p in ours]  # .double() of a float64 tensor aliases it
    state = [[torch.zeros_like(p) for p in ours] for _ in range(3)]
    ref_state = [[torch.zeros_like(p) for p in ref] for _ in range(3)]
    u = [torch.empty_like(p, dtype=torch.float64 if dtype == torch.float64 else torch.float32) for p in ours]
    u_ref = [torch.empty_like(p) for p in ref]
    scale = torch.tensor(0.7, device=device)
    for step in (1, 2):
        g = grads_for(ours, step)
        s = update.adam_step_(ours, g, state[0], state[1], step=step, lr=0.01, weight_decay=0.1, amsgrad=True,
                              max_exp_avg_sqs=state[2], updates=u, step_scale=scale, backend=backend)
        s_ref = adam_step_reference(ref, [x.double() for x in g], *ref_state, u_ref, scale, f64(0.01, device),
                                    f64(step, device), 0.9, 0.999, 1e-8, 0.1, True, True, False, True, False)
        # the reference sees the same rounded inputs each step
        for a, b in zip(ref + sum(ref_state, []), ours + sum(state, [])):
            a.copy_(b)
    # compare the last step: moments stored in dtype, u in the math dtype
    tol = {torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for a, b in zip(u, u_ref):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)
    torch.testing.assert_close(s.double(), s_ref.double(), rtol=tol, atol=0)


DTYPE_TOL = {torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("backend,device", SGD_BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPE_TOL), ids=str)
def test_sgd_step_dtypes_against_float64_reference(backend, device, dtype):
    ours = make_params(device, dtype)
    bufs = [torch.zeros_like(p) for p in ours]
    u = [torch.empty_like(p, dtype=torch.float64 if dtype == torch.float64 else torch.float32) for p in ours]
    ref = [p.double().clone() for p in ours]  # .double() of a float64 tensor aliases it
    ref_bufs = [b.double().clone() for b in bufs]
    u_ref = [torch.empty_like(p) for p in ref]
    scale = torch.tensor(0.7, device=device)
    g = grads_for(ours, 1)
    s = update.sgd_step_(ours, g, bufs, lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=True, first=True,
                         updates=u, step_scale=scale, backend=backend)
    s_ref = sgd_step_reference(ref, [x.double() for x in g], ref_bufs, u_ref, scale, f64(0.05, device), 0.9, 0.0,
                               0.01, True, False, True, True)
    tol = DTYPE_TOL[dtype]
    for a, b in zip(u + ours + bufs, u_ref + ref + ref_bufs):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)
    torch.testing.assert_close(s.double(), s_ref.double(), rtol=tol, atol=0)


@pytest.mark.parametrize("backend,device", APPLY_BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPE_TOL), ids=str)
def test_apply_update_dtypes_against_float64_reference(backend, device, dtype):
    ours = make_params(device, dtype)
    ref = [p.double().clone() for p in ours]  # .double() of a float64 tensor aliases it
    g = torch.Generator().manual_seed(5)
    u = [torch.randn(p.shape, generator=g, dtype=torch.float64).to(device) for p in ours]
    lr = torch.tensor(0.3, device=device)
    update.apply_update_(ours, [x.to(torch.float64 if dtype == torch.float64 else torch.float32) for x in u], lr,
                         weight_decay=0.1, backend=backend)
    apply_update_reference(ref, u, lr, 0.1)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.double(), b, rtol=DTYPE_TOL[dtype], atol=DTYPE_TOL[dtype])


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_update_errors_name_the_problem(backend):
    """The same worded error on every backend (the compiled kernels check the lists themselves and the wrapper
    words what they refuse), and nothing a refused call was given is changed."""
    from stabkernels import backend as B
    if B.why_unavailable(backend, "cpu"):
        pytest.skip(B.why_unavailable(backend, "cpu"))
    p = make_params("cpu")
    g = grads_for(p, 1)
    z = [torch.zeros_like(x) for x in p]
    before = [t.clone() for t in p + z]
    adam = functools.partial(update.adam_step_, lr=0.1, backend=backend)
    with pytest.raises(ValueError, match=r"grads has 3 tensors for 4 params"):
        adam(p, g[:3], z, z, step=1)
    with pytest.raises(ValueError, match=r"exp_avgs\[1\] must have the shape"):
        adam(p, g, [z[0], z[0], z[2], z[3]], z, step=1)
    with pytest.raises(ValueError, match=r"grads\[0\] must be a contiguous torch.float32"):
        adam(p, [g[0].double()] + g[1:], z, z, step=1)
    with pytest.raises(ValueError, match=r"exp_avg_sqs\[1\] must be a contiguous torch.float32 .*\(non-contiguous\)"):
        adam(p, g, z, z[:1] + [torch.zeros(9, 5).t()] + z[2:], step=1)
    with pytest.raises(ValueError, match=r"updates\[3\] must have the shape"):
        adam(p, g, z, z, step=1, updates=[torch.zeros_like(x) for x in p[:3]] + [torch.zeros(2)])
    with pytest.raises(ValueError, match=r"max_exp_avg_sqs has 1 tensors for 4 params"):
        adam(p, g, z, z, step=1, amsgrad=True, max_exp_avg_sqs=z[:1])
    with pytest.raises(ValueError, match="step must be >= 1"):
        adam(p, g, z, z, step=0)
    with pytest.raises(ValueError, match="amsgrad needs"):
        adam(p, g, z, z, step=1, amsgrad=True)
    with pytest.raises(ValueError, match="momentum needs"):
        update.sgd_step_(p, g, None, lr=0.1, momentum=0.9, backend=backend)
    with pytest.raises(ValueError, match=r"momentum_buffers\[0\] must be a contiguous torch.float32"):
        update.sgd_step_(p, g, [b.double() for b in z], lr=0.1, momentum=0.9, backend=backend)
    with pytest.raises(ValueError, match=r"params\[1\] must be contiguous"):
        update.sgd_step_([p[0], torch.randn(4, 3).t()], g[:1] + [torch.randn(3, 4)], None, lr=0.1, backend=backend)
    with pytest.raises(TypeError, match="sgd_step_: params must be a list of tensors"):
        update.sgd_step_(p[0], g[0], None, lr=0.1, backend=backend)  # one tensor would otherwise step row by row
    with pytest.raises(TypeError, match=r"sgd_step_: params\[1\] must be float32.*integer/bool"):
        update.sgd_step_([p[0], torch.ones(3, dtype=torch.long)], g[:1] + [torch.ones(3)], None, lr=0.1,
                         backend=backend)
    with pytest.raises(ValueError, match="apply_update_: params is empty"):
        update.apply_update_([], [], 0.1, backend=backend)
    with pytest.raises(ValueError, match=r"apply_update_: updates\[0\] must be a contiguous torch.float32"):
        update.apply_update_(p, [u.half() for u in z], 0.1, backend=backend)
    for a, b in zip(p + z, before):
        assert torch.equal(a, b)


def test_compiled_update_kernels_refuse_mismatched_lists_before_writing():
    """The raw kernels check every list before touching memory (the wrappers rely on it: they skip their own
    Python checks on the compiled backends), with ValueErrors that name the list and the tensor."""
    from stabkernels import backend as B
    if B.why_unavailable("cpp", "cpu"):
        pytest.skip(B.why_unavailable("cpp", "cpu"))
    C = torch.ops.stabkernels_C
    p = make_params("cpu")
    g = grads_for(p, 1)
    z = [torch.zeros_like(x) for x in p]
    before = [t.clone() for t in p + z]
    one, lr = f64(1), f64(0.1)
    adam = lambda ps, gs, ms, vs, vm=(), us=(), ams=False: C.adam_step_(  # noqa: E731
        ps, gs, ms, vs, list(vm), list(us), one, lr, one, 0.9, 0.999, 1e-8, 0.0, True, ams, False, True, False, None, 0)
    cases = [
        (lambda: adam(p, g[:3], z, z), r"adam_step_: grads has 3 tensors for 4 params"),
        (lambda: adam(p, g, z, z[:1] + [torch.zeros(7)] + z[2:]), r"exp_avg_sqs\[1\] must have the shape of params\[1\]"),
        (lambda: adam(p, g, z, z, vm=z[:2], ams=True), r"max_exp_avg_sqs has 2 tensors"),
        (lambda: adam(p, g, z, z, us=[u.half() for u in z]), r"updates\[0\] must be a contiguous Float"),
        (lambda: adam(p[:1] + [p[1].t()] + p[2:], g, z, z), r"params\[1\] must be contiguous"),
        (lambda: adam([], [], [], []), r"params is empty"),
        (lambda: C.sgd_step_(p, g, z[:2], [], one, lr, 0.9, 0.0, 0.0, False, False, False, True, None),
         r"sgd_step_: momentum_buffers has 2 tensors"),
        (lambda: C.sgd_step_([p[0], torch.ones(3, dtype=torch.long)], g[:1] + [torch.ones(3)], [], [], one, lr,
                             0.0, 0.0, 0.0, False, False, False, True, None), r"params\[1\] must be a dense float32"),
        (lambda: C.apply_update_(p, z[:3], one, 0.0, None, None), r"apply_update_: updates has 3 tensors"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    for a, b in zip(p + z, before):
        assert torch.equal(a, b)
    # lists the options leave unused may be empty; every optional list is checked when given
    C.sgd_step_(p, g, [], [], one, lr, 0.0, 0.0, 0.0, False, False, False, False, None)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_opcheck(backend):
    from stabkernels import backend as B
    if B.why_unavailable(backend, "cpu"):
        pytest.skip(B.why_unavailable(backend, "cpu"))
    p = make_params("cpu")
    g = grads_for(p, 1)
    z = lambda: [torch.zeros_like(x) for x in p]  # noqa: E731
    torch.library.opcheck(torch.ops.stabkernels.adam_step_.default,
                          (p, g, z(), z(), z(), z(), f64(1.0), f64(0.1), f64(2), 0.9, 0.999, 1e-8, 0.01, True, True,
                           False, True, False, None, 0, backend))
    torch.library.opcheck(torch.ops.stabkernels.sgd_step_.default,
                          (p, g, z(), z(), f64(1.0), f64(0.1), 0.9, 0.0, 0.0, True, False, False, True, None, backend))
    torch.library.opcheck(torch.ops.stabkernels.apply_update_.default,
                          (p, z(), torch.tensor(0.5), 0.1, None, None, backend))
    # the new arguments: a skip flag (kept and skipped), clip statistics (also, only), per-tensor lr, step scale
    lrs = torch.rand(len(p), dtype=torch.float64)
    for flag in (0.0, 1.0):
        for stats in (1, 2):
            torch.library.opcheck(torch.ops.stabkernels.adam_step_.default,
                                  (p, g, z(), z(), [], z(), f64(1.0), lrs, f64(2), 0.9, 0.999, 1e-8, 0.01, True,
                                   False, False, True, False, f64(flag), stats, backend))
        torch.library.opcheck(torch.ops.stabkernels.sgd_step_.default,
                              (p, g, z(), z(), f64(1.0), f64(0.1), 0.9, 0.0, 0.0, True, False, False, True, f64(flag),
                               backend))
        torch.library.opcheck(torch.ops.stabkernels.apply_update_.default,
                              (p, z(), torch.rand(len(p), dtype=torch.float64), 0.1, f64(0.5), f64(flag), backend))


@pytest.mark.parametrize("backend,device", ADAM_BACKENDS)
def test_tensor_step_lr_and_eps_raw_give_the_numbers_of_python_ones(backend, device):
    """step and lr as 0-d tensors (the capturable, recompile-free form) step exactly as the Python numbers
    do; eps_raw equals eps / sqrt(1 - beta2^step) passed by hand (what S-Adam's eps_mode="authors" did)."""
    import math
    runs = {}
    for mode in ("numbers", "tensors", "eps_by_hand", "eps_raw"):
        ps = make_params(device)
        m, v = [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps]
        u = [torch.empty_like(p) for p in ps]
        sums = []
        for step in range(1, 4):
            lr = 0.01 * step
            kw = dict(step=step, lr=lr, eps=1e-3)
            if mode == "tensors":
                kw.update(step=torch.tensor(step, device=device), lr=torch.tensor(lr, dtype=torch.float64,
                                                                                  device=device))
            elif mode == "eps_by_hand":
                kw.update(eps=1e-3 / math.sqrt(1 - 0.999 ** step))
            elif mode == "eps_raw":
                kw.update(eps_raw=True)
            sums.append(update.adam_step_(ps, grads_for(ps, step), m, v, updates=u, weight_decay=0.1,
                                          backend=backend, **kw))
        runs[mode] = ps + m + v + u + sums
    for a, b in zip(runs["numbers"], runs["tensors"]):
        assert torch.equal(a, b)
    for a, b in zip(runs["eps_by_hand"], runs["eps_raw"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", SGD_BACKENDS)
def test_sgd_tensor_lr_gives_the_numbers_of_a_python_lr(backend, device):
    runs = []
    for lr in (0.05, torch.tensor(0.05, dtype=torch.float64, device=device), torch.tensor([0.05], dtype=torch.float64)):
        ps = make_params(device)
        bufs = [torch.zeros_like(p) for p in ps]
        sums = [update.sgd_step_(ps, grads_for(ps, s), bufs, lr=lr, momentum=0.9, first=s == 1, backend=backend)
                for s in (1, 2)]
        runs.append(ps + bufs + sums)
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


def test_per_step_scalars_reach_the_device_without_a_host_copy():
    """Numbers become a fill on the params' device (torch.tensor(x, device=cuda) would be a blocking copy);
    tensors on the device are converted there; a CPU tensor for another device is read on the host (no GPU
    sync) and filled; any other device is refused. The meta device stands in for a GPU."""
    meta = torch.device("meta")
    for x in (0.5, 3, torch.tensor(0.5), torch.tensor([2.0], dtype=torch.float64)):
        with DispatchedOps() as rec:
            t = update.scalar_tensor(x, "lr", meta)
        assert t.device == meta and t.dtype == torch.float64 and t.shape == ()
        assert all(op in ("aten.full", "aten._local_scalar_dense") for op in rec.qualified), rec.qualified
    on_dev = torch.ones((), device=meta, dtype=torch.float32)
    with DispatchedOps() as rec:
        t = update.scalar_tensor(on_dev, "lr", meta)
    assert t.dtype == torch.float64 and "aten._to_copy" in rec.qualified and "aten.full" not in rec.qualified
    t64 = torch.ones((1,), device="cpu", dtype=torch.float64)
    assert update.scalar_tensor(t64, "lr", torch.device("cpu")).data_ptr() == t64.data_ptr()  # no copy at all
    with pytest.raises(ValueError, match="lr must be a number or a one-element tensor on cpu"):
        update.scalar_tensor(torch.ones((), device=meta), "lr", torch.device("cpu"))
    with pytest.raises(ValueError, match="step must hold one number"):
        update.scalar_tensor(torch.ones(2), "step", torch.device("cpu"))
    with pytest.raises(ValueError, match="step_scale must be a number"):  # through the public op
        z = [torch.zeros(3)]
        update.sgd_step_(z, [torch.zeros(3)], [None], lr=0.1, step_scale="1")


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_adam_step_below_one_is_refused(backend):
    from stabkernels import backend as B
    if B.why_unavailable(backend, "cpu"):
        pytest.skip(B.why_unavailable(backend, "cpu"))
    p = make_params("cpu")
    z = [torch.zeros_like(x) for x in p]
    with pytest.raises(ValueError, match="step must be >= 1"):
        update.adam_step_(p, grads_for(p, 1), z, z, step=0, lr=0.1, backend=backend)
    if backend == "cpp":  # the CPU kernel reads a tensor step (free on CPU); a CUDA kernel cannot
        with pytest.raises(ValueError, match="step must be >= 1"):
            update.adam_step_(p, grads_for(p, 1), z, z, step=torch.tensor(0), lr=0.1, backend=backend)


# --------------------------------------------------------------------------------------------------
# the skip flag (SPEC 7.1) and update clipping's statistics and per-tensor learning rates (SPEC 7.2)

ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _nan_grads(params, step):
    gs = grads_for(params, step)
    gs[0].view(-1)[0] = float("nan")
    gs[-1].view(-1)[-1] = float("inf")
    return gs


@pytest.mark.parametrize("backend,device", ADAM_BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_skip_leaves_everything_bit_identical(backend, device, dtype, amsgrad):
    """A skipped step writes nothing: params, moments, max v and u keep their bits (NaN/inf gradients too), the
    sums are 0, and a counter the skip left at 0 is accepted; a flag of 0 is the step without a flag."""
    ps = make_params(device, dtype)
    state = [[torch.zeros_like(p) for p in ps] for _ in range(3)]
    us = [torch.full_like(p, 7.0, dtype=_acc(dtype)) for p in ps]
    kw = dict(lr=0.01, weight_decay=0.1, amsgrad=amsgrad, max_exp_avg_sqs=state[2], updates=us, backend=backend)
    skip1 = torch.ones((), dtype=torch.bool, device=device)
    for clip in (False, True):  # a skipped first step: the counter stays at 0
        s = update.adam_step_([p.clone() for p in ps], _nan_grads(ps, 1), *[[x.clone() for x in st] for st in state[:2]],
                              step=torch.zeros((), device=device), skip=skip1, clip_stats=clip,
                              **{**kw, "max_exp_avg_sqs": [x.clone() for x in state[2]]})
        assert s.shape == ((2, len(ps)) if clip else (len(ps),)) and not s.any()
    update.adam_step_(ps, grads_for(ps, 1), state[0], state[1], step=1, **kw)
    before = [t.clone() for t in ps + sum(state, []) + us]
    for skip in (skip1, torch.tensor(1.0, dtype=torch.float64, device=device), True):
        for clip in (False, True):
            s = update.adam_step_(ps, _nan_grads(ps, 2), state[0], state[1], step=2, skip=skip, clip_stats=clip,
                                  **kw)
            assert not s.any()
            for a, b in zip(before, ps + sum(state, []) + us):
                assert torch.equal(a, b)
    # skip = 0: the step without a flag, bit for bit
    runs = []
    for skip in (None, torch.zeros((), device=device)):
        p2, st2, u2 = [p.clone() for p in ps], [[x.clone() for x in st] for st in state], [u.clone() for u in us]
        s = update.adam_step_(p2, grads_for(ps, 2), st2[0], st2[1], step=2, skip=skip,
                              **{**kw, "max_exp_avg_sqs": st2[2], "updates": u2})
        runs.append(p2 + sum(st2, []) + u2 + [s])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", SGD_BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_sgd_skip_leaves_everything_bit_identical(backend, device, dtype):
    ps = make_params(device, dtype)
    bufs = [torch.zeros_like(p) for p in ps]
    us = [torch.full_like(p, 7.0, dtype=_acc(dtype)) for p in ps]
    kw = dict(lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=True, updates=us, backend=backend)
    update.sgd_step_(ps, grads_for(ps, 1), bufs, first=True, **kw)
    before = [t.clone() for t in ps + bufs + us]
    for first in (False, True):
        s = update.sgd_step_(ps, _nan_grads(ps, 2), bufs, first=first, skip=torch.ones((), device=device), **kw)
        assert not s.any()
        for a, b in zip(before, ps + bufs + us):
            assert torch.equal(a, b)
    runs = []
    for skip in (None, torch.zeros((), dtype=torch.bool, device=device)):
        p2, b2, u2 = [p.clone() for p in ps], [b.clone() for b in bufs], [u.clone() for u in us]
        s = update.sgd_step_(p2, grads_for(ps, 2), b2, skip=skip, **{**kw, "updates": u2})
        runs.append(p2 + b2 + u2 + [s])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend,device", APPLY_BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_apply_update_skip_per_tensor_lr_and_step_scale(backend, device, dtype):
    """One lr per tensor and a step scale against the float64 reference; a skip flag writes nothing (NaN u
    too); one lr equals the same lr repeated per tensor; a step scale of 1 equals none, bit for bit."""
    ours = make_params(device, dtype)
    ref = [p.double().clone() for p in ours]
    g = torch.Generator().manual_seed(5)
    u = [torch.randn(p.shape, generator=g, dtype=torch.float64).to(device) for p in ours]
    ua = [x.to(_acc(dtype)) for x in u]
    lrs = torch.tensor([0.3, 0.01, 1.5, 0.2], dtype=torch.float64, device=device)
    scale = torch.tensor(0.6, dtype=torch.float64, device=device)
    update.apply_update_(ours, ua, lrs, weight_decay=0.1, step_scale=scale, backend=backend)
    apply_update_reference(ref, u, lrs, 0.1, scale)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.double(), b, rtol=DTYPE_TOL.get(dtype, 1e-6), atol=DTYPE_TOL.get(dtype, 1e-6))
    before = [p.clone() for p in ours]
    nan_u = [x.clone() for x in ua]
    nan_u[1].view(-1)[0] = float("nan")
    update.apply_update_(ours, nan_u, lrs, weight_decay=0.1, skip=torch.ones((), device=device), backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(before, ours))
    runs = []
    for lr, kw in ((0.3, {}), (torch.full((4,), 0.3, dtype=torch.float64, device=device), {}),
                   (0.3, dict(step_scale=1.0, skip=False))):
        ps = [p.clone() for p in before]
        update.apply_update_(ps, ua, lr, weight_decay=0.1, backend=backend, **kw)
        runs.append(ps)
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], run))
    with pytest.raises(ValueError, match="lr must hold one number or one per tensor"):
        update.apply_update_(ours, ua, lrs[:3], backend=backend)


CLIP_SHAPES = [(37,), (5, 9), (3, 4, 5), (1,), (129, 33)]


@pytest.mark.parametrize("backend,device", ADAM_BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("cfg", [dict(), dict(amsgrad=True, eps_raw=True), dict(decoupled=False, maximize=True)],
                         ids=["adamw", "amsgrad-eps_raw", "adam-l2-maximize"])
def test_adam_clip_stats_against_the_formula(backend, device, dtype, cfg):
    """Row 1 of clip_stats: sum(g^2 / max(v_hat, eps^2)) per tensor, v_hat = (max v or v) / bc2 of this step,
    g the gradient entering the moments, in float64 here from the same inputs (the kernel's v is unrounded);
    row 0 is sum(u^2), the sums without clip_stats; the step itself is unchanged by clip_stats."""
    g0 = torch.Generator().manual_seed(3)
    ps = [torch.randn(s, generator=g0, dtype=torch.float64).to(device=device, dtype=dtype) for s in CLIP_SHAPES]
    eps, b2, wd = 1e-3, 0.99, 0.05
    amsgrad, maximize, decoupled = cfg.get("amsgrad", False), cfg.get("maximize", False), cfg.get("decoupled", True)
    state = [[torch.zeros_like(p) for p in ps] for _ in range(3)]
    for step in (1, 2, 3):
        gs = [(x * (1 + 20 * (step == 3))).to(dtype) for x in grads_for(ps, step)]
        before = [t.double() for t in ps + sum(state, [])]
        runs = []
        for clip in (True, False):
            p2, st = [p.clone() for p in ps], [[x.clone() for x in s] for s in state]
            s = update.adam_step_(p2, gs, st[0], st[1], step=step, lr=0.01, betas=(0.9, b2), eps=eps,
                                  weight_decay=wd, amsgrad=amsgrad, max_exp_avg_sqs=st[2], maximize=maximize,
                                  decoupled=decoupled, eps_raw=cfg.get("eps_raw", False), clip_stats=clip,
                                  backend=backend)
            runs.append((p2, st, s))
        (p2, st, s), (p3, st3, s3) = runs
        assert s.shape == (2, len(ps)) and torch.equal(s[0], s3)
        assert all(torch.equal(a, b) for a, b in zip(p2 + sum(st, []), p3 + sum(st3, [])))
        want = []
        for i in range(len(ps)):
            p0, v0, vm0 = before[i], before[2 * len(ps) + i], before[3 * len(ps) + i]
            g = gs[i].double() * (-1 if maximize else 1)
            if not decoupled:
                g = g + wd * p0
            v = v0 * b2 + g * (1 - b2) * g
            vh = torch.maximum(vm0, v) if amsgrad else v
            want.append((g * g / torch.clamp_min(vh / (1 - b2 ** step), eps * eps)).sum())
        tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2e-2)
        torch.testing.assert_close(s[1].double(), torch.stack(want), rtol=tol, atol=0)
        ps, state = p2, st


@pytest.mark.parametrize("backend,device", ADAM_BACKENDS)
def test_clip_lrs_and_the_two_pass_clipped_step_equal_stable_adamw_reference_float64(backend, device):
    """adam_step_(clip_stats) + clip_lrs + apply_update_ with per-tensor lrs is StableAdamW, against the
    plain-torch reference, float64, odd shapes, clipping active on some tensors."""
    from stabkernels.optim.skipstep import stable_adamw_reference
    g0 = torch.Generator().manual_seed(4)
    ps = [torch.randn(s, generator=g0, dtype=torch.float64).to(device) for s in CLIP_SHAPES]
    ref = [p.clone() for p in ps]
    m, v = [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps]
    mr, vr = [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps]
    us = [torch.empty_like(p) for p in ps]
    clipped = 0
    for step in range(1, 6):
        gs = [x * (1 + 30 * (step == 3) * (i % 2)) for i, x in enumerate(grads_for(ps, step))]
        sums = update.adam_step_(ps, gs, m, v, step=step, lr=1.0, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1,
                                 updates=us, apply=False, clip_stats=True, backend=backend)
        lrs = update.clip_lrs(sums[1], ps, 0.05)
        clipped += int((lrs < 0.05).sum())
        update.apply_update_(ps, us, lrs, 0.1, backend=backend)
        for i in range(len(ps)):
            stable_adamw_reference(ref[i], gs[i], mr[i], vr[i], step, 0.05, (0.9, 0.99), 1e-8, 0.1)
        for a, b in zip(ps, ref):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    assert clipped > 0


@pytest.mark.parametrize("backend,device", ADAM_BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("cfg", [dict(), dict(amsgrad=True, eps_raw=True), dict(decoupled=False, maximize=True)],
                         ids=["adamw", "amsgrad-eps_raw", "adam-l2-maximize"])
def test_clipped_step_is_the_statistics_pass_clip_lrs_and_the_step_bit_for_bit(backend, device, dtype, cfg):
    """clip_stats="clipped" (StableAdamW's step in one call) equals the "only" pass, clip_lrs and a step at those
    rates: moments, max v, u and both rows of sums bit for bit, parameters to the rates' last place (the C++
    backend takes a correctly rounded square root for the rates; torch's CPU sqrt is 1 ulp off on about 1% of
    float64 inputs), over steps where clipping binds on some tensors and a skipped one. On the C++ backend, which
    fuses the passes per block of about 2^20 elements (the second finding part of the first's g and v in cache),
    the tensors make several blocks, one tensor larger than a block."""
    big = backend == "cpp" and dtype in (torch.float32, torch.float64)
    shapes = [(37,), (1031, 1100), (5, 9), (700, 999), (3, 4, 5), (129, 33)] if big else CLIP_SHAPES
    g0 = torch.Generator().manual_seed(6)
    ps = [torch.randn(s, generator=g0, dtype=torch.float64).to(device=device, dtype=dtype) for s in shapes]
    amsgrad = cfg.get("amsgrad", False)
    kw = dict(betas=(0.9, 0.99), eps=1e-3, weight_decay=0.1, amsgrad=amsgrad, decoupled=cfg.get("decoupled", True),
              maximize=cfg.get("maximize", False), eps_raw=cfg.get("eps_raw", False), backend=backend)
    lr = torch.tensor(0.05, dtype=torch.float64, device=device)
    if cfg.get("maximize"):  # one learning rate per tensor
        lr = torch.linspace(0.01, 0.08, len(ps), dtype=torch.float64, device=device)
    fused = [p.clone() for p in ps], *[[torch.zeros_like(p) for p in ps] for _ in range(3)], \
        [torch.empty_like(p, dtype=_acc(dtype)) for p in ps]
    two = [[t.clone() for t in ts] for ts in fused]
    clipped = 0
    for step in range(1, 5):
        gs = [(x * (1 + 30 * (step == 3) * (i % 2))).to(dtype) for i, x in enumerate(grads_for(ps, step))]
        skip = torch.tensor(float(step == 2), device=device)
        p, m, v, vm, u = fused
        s = update.adam_step_(p, gs, m, v, step=step, lr=lr, max_exp_avg_sqs=vm, updates=u, skip=skip,
                              clip_stats="clipped", **kw)
        p, m, v, vm, u = two
        stats = update.adam_step_(p, gs, m, v, step=step, lr=1.0, max_exp_avg_sqs=vm, apply=False, skip=skip,
                                  clip_stats="only", **kw)[1]
        lrs = update.clip_lrs(stats, p, lr)
        clipped += int((lrs < lr).sum()) * (step != 2)  # (lr: one number or one per tensor)
        s2 = update.adam_step_(p, gs, m, v, step=step, lr=lrs, max_exp_avg_sqs=vm, updates=u, skip=skip, **kw)
        assert s.shape == (2, len(ps)) and torch.equal(s[0], s2) and torch.equal(s[1], stats)
        for a, b in zip(sum(fused[1:], []), sum(two[1:], [])):
            assert torch.equal(a, b)
        for a, b in zip(fused[0], two[0]):
            # the rates' last place, at the tensor's scale (p * decay - lr u may cancel to near 0)
            torch.testing.assert_close(a, b, rtol=0, atol=torch.finfo(dtype).eps * float(b.abs().max()))
    assert clipped > 0


@pytest.mark.parametrize("backend,device", [p for p in ADAM_BACKENDS if p.values[0] != "torch"])
def test_the_clipped_step_is_one_op_on_every_kernel_backend(backend, device):
    """clip_stats="clipped" is one call of the op on the kernel backends: on CUDA and Triton the statistics pass
    and the step are two launches per dtype group whose step forms the clipped rates itself, where the composite
    (the torch reference's way) adds ~10 small device ops between them (clip_lrs, the rows' select and stack),
    each a launch on a GPU. Beside the op: only the lr and step_scale scalars made for the device."""
    ps = [torch.randn(s, device=device) for s in CLIP_SHAPES] + [torch.randn(7, dtype=torch.float64, device=device)]
    gs = [torch.randn_like(p) * 10 for p in ps]
    m, v = [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps]
    step = torch.ones((), dtype=torch.float64, device=device)
    for k in range(2):
        with DispatchedOps() as ops:
            sums = update.adam_step_(ps, gs, m, v, step=step, lr=0.01, clip_stats="clipped", backend=backend)
        assert sums.shape == (2, len(ps))
        assert ops.names.count("adam_step_") == 1 and set(ops.names) <= {"adam_step_", "ones", "full", "view"}, \
            ops.names


@pytest.mark.parametrize("backend,device", ADAM_BACKENDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_adam_clip_stats_only_writes_nothing_and_per_tensor_lr(backend, device, dtype):
    """clip_stats="only" returns row 1 of clip_stats=True (row 0 zero) and leaves every tensor as it was (u
    too); one lr per tensor steps each tensor exactly as a call with that tensor's lr alone would."""
    ps = make_params(device, dtype)
    state = [[torch.zeros_like(p) for p in ps] for _ in range(3)]
    update.adam_step_(ps, grads_for(ps, 1), state[0], state[1], step=1, lr=0.01, weight_decay=0.1, amsgrad=True,
                      max_exp_avg_sqs=state[2], backend=backend)
    gs = [x * (1 + 30 * (i % 2)) for i, x in enumerate(grads_for(ps, 2))]
    us = [torch.full_like(p, 7.0, dtype=_acc(dtype)) for p in ps]
    kw = dict(step=2, weight_decay=0.1, amsgrad=True, backend=backend)
    before = [t.clone() for t in ps + sum(state, []) + us]
    only = update.adam_step_(ps, gs, state[0], state[1], lr=0.01, max_exp_avg_sqs=state[2], updates=us,
                             clip_stats="only", **kw)
    assert all(torch.equal(a, b) for a, b in zip(before, ps + sum(state, []) + us))
    st = [[x.clone() for x in s] for s in state]
    full = update.adam_step_([p.clone() for p in ps], gs, st[0], st[1], lr=0.01, max_exp_avg_sqs=st[2],
                             clip_stats=True, **kw)
    assert only.shape == full.shape == (2, len(ps)) and not only[0].any()
    assert torch.equal(only[1], full[1])
    lrs = torch.tensor([0.01, 0.002, 0.03, 0.0], dtype=torch.float64, device=device)
    p_all, st_all = [p.clone() for p in ps], [[x.clone() for x in s] for s in state]
    s_all = update.adam_step_(p_all, gs, st_all[0], st_all[1], lr=lrs, max_exp_avg_sqs=st_all[2], **kw)
    for i in range(len(ps)):
        p1, st1 = [ps[i].clone()], [[s[i].clone()] for s in state]
        s1 = update.adam_step_(p1, gs[i:i + 1], st1[0], st1[1], lr=lrs[i], max_exp_avg_sqs=st1[2], **kw)
        assert torch.equal(p1[0], p_all[i]) and all(torch.equal(a[0], b[i]) for a, b in zip(st1, st_all))
        assert torch.equal(s1[0].to(s_all.dtype), s_all[i])
    with pytest.raises(ValueError, match="lr must hold one number or one per tensor"):
        update.adam_step_(ps, gs, state[0], state[1], lr=lrs[:2], max_exp_avg_sqs=state[2], **kw)
    with pytest.raises(ValueError, match="clip_stats must be"):
        update.adam_step_(ps, gs, state[0], state[1], lr=0.01, max_exp_avg_sqs=state[2], clip_stats=2, **kw)


# --------------------------------------------------------------------------------------------------
# advance_steps_: the step counters (SPEC 7.1)

@pytest.mark.parametrize("backend,device", backend_params("advance_steps_", devices=("cpu",)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_advance_steps_equals_the_reference(dtype, backend, device):
    """+1 per counter, +0 on a skipped step, on the counters' own values (a counter at 2^24 - 1 in float32
    rounds as torch's add does); nothing else is touched."""
    start = [0.0, 3.0, 2.0 ** 24 - 1, 17.0, 1e6]
    for skip in (None, f64(0.0), f64(1.0), f64(-2.5)):
        ours = [torch.tensor(v, dtype=dtype) for v in start]
        ref = [torch.tensor(v, dtype=dtype) for v in start]
        update.advance_steps_(ours, skip, backend=backend)
        update.advance_steps_reference(ref, skip)
        assert all(torch.equal(a, b) for a, b in zip(ours, ref))
        moved = skip is None or float(skip) == 0
        assert all(torch.equal(a, torch.tensor(v, dtype=dtype) + moved) for a, v in zip(ours, start))


def test_advance_steps_backends(monkeypatch):
    """The optimizers' GPU backends take torch's one-launch _foreach_add_; a list with a counter the C++ loop
    cannot hold goes there too (the C++ op itself words the error); opcheck of the op."""
    calls = []
    ref = update.advance_steps_reference

    def spy(*args):
        calls.append(1)
        ref(*args)

    monkeypatch.setattr(update, "advance_steps_reference", spy)
    for b in ("triton", "cuda", "torch"):
        update.advance_steps_([torch.zeros(())], None, backend=b)
    ints = [torch.zeros((), dtype=torch.int64)]
    update.advance_steps_(ints, None)
    assert len(calls) == 4 and int(ints[0]) == 1
    monkeypatch.undo()
    mixed = [torch.zeros(()), torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.float16)]
    update.advance_steps_(mixed, None, backend="auto")
    assert [float(t) for t in mixed] == [1.0, 1.0, 1.0]
    if update._backend.why_unavailable("cpp", "cpu", "advance_steps_") is None:
        with pytest.raises(ValueError, match=r"steps\[1\] must be a one-element float32 or float64 CPU tensor"):
            torch.ops.stabkernels_C.advance_steps_(mixed, None)
        steps = [torch.zeros(()), torch.zeros((), dtype=torch.float64)]
        for skip in (None, f64(1.0)):
            torch.library.opcheck(torch.ops.stabkernels.advance_steps_, ([t.clone() for t in steps], skip, "cpp"))

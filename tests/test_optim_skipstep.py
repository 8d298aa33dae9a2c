"""SkipStep (OLMo-core's skip rule, on the device) and StableAdamW (update clipping) against references."""
import copy
import math

import pytest
import torch
from torch import nn

from stabkernels.optim import (PSSAdamW, RadiusAdamW, RadiusController, RadiusSGD, SAdam, SkipStep,
                               StableAdamW)
from stabkernels.optim.skipstep import stable_adamw_reference

from stabkernels import backend, update

from .helpers import DispatchedOps, backend_params


class OlmoRule:
    """OLMo-core's SkipStepOptimizer (src/olmo_core/optim/skip_step_optimizer.py), restated: the last
    window + 1 values kept; inactive below max(20, window // 2) values; skip when |x - mean| / std of the
    previous values exceeds sigma_factor for the loss or the gradient norm."""

    def __init__(self, window=128, sigma_factor=6):
        self.window, self.sigma = window, sigma_factor
        self.losses, self.norms = [], []

    def step(self, loss, norm) -> bool:  # True: skipped
        for lst, x in ((self.losses, loss), (self.norms, norm)):
            lst.append(torch.tensor(x, dtype=torch.float64))
            while len(lst) > self.window + 1:
                lst.pop(0)
        if len(self.losses) < max(20, self.window // 2):
            return False
        keep = True
        for lst in (self.losses, self.norms):
            std, mean = torch.std_mean(torch.stack(lst[:-1]))
            keep = keep and bool((lst[-1] - mean).abs().div(std) <= self.sigma)
        return not keep


def scripted(kind, n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    loss = (3 - torch.arange(n, dtype=torch.float64) / n + 0.05 * torch.randn(n, generator=g, dtype=torch.float64))
    norm = 1 + 0.1 * torch.rand(n, generator=g, dtype=torch.float64)
    loss, norm = loss.tolist(), norm.tolist()
    if kind == "loss":
        loss[150] += 5.0
        loss[170] += 0.2  # about 4 sigma: kept
    elif kind == "norm":
        norm[140] = 50.0
        norm[141] = 40.0  # the first spike is in the window now: kept
    elif kind == "nonfinite":
        loss[130] = math.nan
        norm[160] = math.inf
    elif kind == "early":
        loss[10] = 1e6  # inside the warm-up: never skipped
        norm[30] = 1e6
    return loss, norm


def model_opt(make, seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 3))
    return m, make(m.parameters())


def grads_for(m, i):
    g = torch.Generator().manual_seed(1000 + i)
    for p in m.parameters():
        p.grad = torch.randn(p.shape, generator=g)


RULE_BACKENDS = backend_params("skip_rule_", devices=("cpu",))
# the kernels against the reference, on CPU and (make gpu-check) on CUDA
RULE_KERNELS = [p for p in backend_params("skip_rule_") if p.values[0] != "torch"]


@pytest.mark.parametrize("backend,device", RULE_BACKENDS)
@pytest.mark.parametrize("kind", ["loss", "norm", "nonfinite", "early", "none"])
@pytest.mark.parametrize("window", [128, 40])
def test_skips_exactly_the_steps_olmo_skips(kind, window, backend, device):
    loss, norm = scripted(kind)
    ref = OlmoRule(window)
    want = [ref.step(l, n) for l, n in zip(loss, norm)]
    m, opt = model_opt(lambda ps: SkipStep(torch.optim.SGD(ps, lr=0.1), window=window, backend=backend))
    got = []
    for i, (l, n) in enumerate(zip(loss, norm)):
        grads_for(m, i)
        opt.step(loss=torch.tensor(l), grad_norm=torch.tensor(n))
        got.append(bool(opt.last.skipped))
    assert got == want
    assert int(opt.skipped_steps()) == sum(want)
    if kind != "none":
        assert sum(want) >= 1 or kind == "early"
    if kind == "early":
        assert sum(want[:window // 2 if window >= 40 else 20]) == 0


def rule_series(n, seed):
    """A loss series with spikes, a NaN, an inf and a stretch of equal values (std 0: a skip), and a norm series."""
    g = torch.Generator().manual_seed(seed)
    loss = 2 + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    norm = 1 + 0.05 * torch.rand(n, generator=g, dtype=torch.float64)
    loss[n // 3] += 10
    norm[n // 2] = 30.0
    loss[n // 2 + 3] = math.nan
    norm[2 * n // 3] = -math.inf
    loss[n - 12: n - 4] = 1.5
    return loss, norm


@pytest.mark.parametrize("backend,device", RULE_KERNELS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("window,warmup", [(7, 3), (16, 9), (5, 40)])
def test_skip_rule_equals_the_reference(window, warmup, rows, dtype, backend, device):
    """skip_rule_ on every backend against the torch reference, value by value: keep, the window's contents
    (bit for bit) and the skip count, through the warm-up, the window's wrap-around, spikes, NaN/inf and a
    window of equal values; the loss and norm in every float dtype (read as they are, converted to float64)."""
    loss, norm = rule_series(60, seed=window + rows)
    state = {b: (torch.zeros(2, window, dtype=torch.float64, device=device),
                 torch.zeros((), dtype=torch.int64, device=device)) for b in ("torch", backend)}
    keeps = {b: [] for b in state}
    for count in range(len(loss)):
        x = loss[count].to(dtype).to(device)
        gn = norm[count].to(dtype).to(device) if rows == 2 else None
        for b, (hist, skipped) in state.items():
            keep = update.skip_rule_(hist, skipped, x, gn, count=count, warmup=warmup, sigma_factor=3.0, backend=b)
            assert keep.dtype == torch.bool and keep.shape == () and keep.device.type == device
            keeps[b].append(bool(keep))
    assert keeps[backend] == keeps["torch"]
    assert torch.equal(state[backend][0], state["torch"][0])
    assert torch.equal(state[backend][1], state["torch"][1])
    assert 3 <= int(state["torch"][1]) < len(loss) - warmup or warmup >= len(loss)  # the series does skip


@pytest.mark.parametrize("backend,device", RULE_BACKENDS)
def test_skip_rule_bad_input(backend, device):
    hist, skipped, x = torch.zeros(2, 8, dtype=torch.float64), torch.zeros((), dtype=torch.int64), torch.ones(())
    kw = dict(count=0, warmup=3, sigma_factor=6.0, backend=backend)
    with pytest.raises(ValueError, match="history must be a contiguous"):
        update.skip_rule_(hist.float(), skipped, x, **kw)
    with pytest.raises(ValueError, match="history must be a contiguous"):
        update.skip_rule_(torch.zeros(3, 8, dtype=torch.float64), skipped, x, **kw)
    with pytest.raises(ValueError, match="history must be a contiguous"):
        update.skip_rule_(torch.zeros(8, 2, dtype=torch.float64).t(), skipped, x, **kw)
    with pytest.raises(ValueError, match="skipped must be a one-element int64"):
        update.skip_rule_(hist, skipped.float(), x, **kw)
    with pytest.raises(ValueError, match="loss must be a one-element float tensor"):
        update.skip_rule_(hist, skipped, torch.ones(2), **kw)
    with pytest.raises(ValueError, match="grad_norm must be a one-element float tensor"):
        update.skip_rule_(hist, skipped, x, torch.ones((), dtype=torch.int64), **kw)
    with pytest.raises(ValueError, match="count must be an int >= 0"):
        update.skip_rule_(hist, skipped, x, **{**kw, "count": -1})
    with pytest.raises(ValueError, match="loss must be a one-element float tensor"):
        update.skip_rule_(hist, skipped, None, **kw)
    with pytest.raises(ValueError, match="warmup must be an int >= 1"):
        update.skip_rule_(hist, skipped, x, **{**kw, "warmup": 0})
    with pytest.raises(ValueError, match="sigma_factor must be a number > 0"):
        update.skip_rule_(hist, skipped, x, **{**kw, "sigma_factor": -1.0})
    assert not hist.any() and int(skipped) == 0  # nothing was written


def test_skip_rule_opcheck():
    hist = torch.randn(2, 6, dtype=torch.float64)
    for b in [b for b in ("torch", "cpp") if backend.why_unavailable(b, "cpu", "skip_rule_") is None]:
        for gn in (None, torch.tensor(1.5)):
            torch.library.opcheck(torch.ops.stabkernels.skip_rule_,
                                  (hist.clone(), torch.zeros((), dtype=torch.int64), torch.tensor(0.3), gn, 6, 3,
                                   6.0, b))


def test_the_rule_is_one_kernel():
    """SkipStep's decision dispatches one op (the rule) beside detaching its inputs: the ~15 small torch ops it
    was cost ~0.25 ms a step on a CPU whose caches the step had just flushed (6% of a ResNet-18 AdamW step)."""
    m, opt = model_opt(lambda ps: SkipStep(torch.optim.SGD(ps, lr=0.1), window=8, warmup=3))
    opt.decide(torch.tensor(1.0), torch.tensor(2.0))  # the first call makes the window and the count
    for i in range(1, 12):
        grads_for(m, i)
        loss, gn = torch.tensor(1.0 + 0.01 * (i % 3)), torch.tensor(2.0 + 0.01 * (i % 5))
        with DispatchedOps() as ops:
            keep = opt.decide(loss, gn)
        # the rule, its inputs detached, and last.skipped (~keep)
        assert ops.names.count("skip_rule_") == 1 and set(ops.names) <= {"skip_rule_", "detach", "bitwise_not"}, \
            ops.names
        assert len(ops.names) <= 4, ops.names
        assert bool(keep)


OPTS = {
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "AdamW-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
    "SGD-momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "StableAdamW": lambda ps: StableAdamW(ps, lr=1e-2),
}


def state_tensors(opt):
    return [t.clone() for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("name", list(OPTS))
def test_skipped_steps_leave_everything_and_kept_steps_are_bit_identical(name):
    loss, norm = scripted("loss", n=200)
    loss[70] = math.nan
    m1, plain = model_opt(OPTS[name])
    m2, inner = model_opt(OPTS[name])
    wrapped = SkipStep(inner, window=64)
    skipped = 0
    for i, (l, n) in enumerate(zip(loss, norm)):
        grads_for(m2, i)
        before = [p.clone() for p in m2.parameters()], state_tensors(inner)
        wrapped.step(loss=l, grad_norm=n)
        if bool(wrapped.last.skipped):
            skipped += 1
            assert all(torch.equal(a, b) for a, b in zip(before[0], m2.parameters()))
            assert all(torch.equal(a, b) for a, b in zip(before[1], state_tensors(inner)))
        else:
            grads_for(m1, i)
            plain.step()
            assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
            assert all(torch.equal(a, b) for a, b in zip(state_tensors(plain), state_tensors(inner)))
    # the spike, the NaN, and (OLMo-core's rule: a NaN stays in the window) every step while the NaN is in it
    assert skipped == 2 + 64 - 1 or skipped >= 2


def test_state_dict_resumes_bit_identically():
    loss, norm = scripted("loss", n=200)
    m1, opt1 = model_opt(lambda ps: SkipStep(torch.optim.AdamW(ps, lr=1e-2), window=32))
    for i in range(120):
        grads_for(m1, i)
        opt1.step(loss=loss[i])  # grad norm computed with sq_norms
    m2, opt2 = model_opt(lambda ps: SkipStep(torch.optim.AdamW(ps, lr=1e-2), window=32))
    m2.load_state_dict(copy.deepcopy(m1.state_dict()))
    opt2.load_state_dict(copy.deepcopy(opt1.state_dict()))
    for i in range(120, 180):
        for m, o in ((m1, opt1), (m2, opt2)):
            grads_for(m, i)
            o.step(loss=loss[i])
        assert torch.equal(opt1.last.skipped, opt2.last.skipped)
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert torch.equal(opt1.skipped_steps(), opt2.skipped_steps()) and int(opt1.skipped_steps()) >= 1


def test_bad_input_raises_clear_errors():
    m, opt = model_opt(lambda ps: torch.optim.SGD(ps, lr=0.1))
    with pytest.raises(ValueError, match="window"):
        SkipStep(opt, window=1)
    with pytest.raises(ValueError, match="sigma_factor"):
        SkipStep(opt, sigma_factor=-1)
    with pytest.raises(ValueError, match="warmup"):
        SkipStep(opt, warmup=2)
    with pytest.raises(TypeError, match="wraps a torch.optim.Optimizer"):
        SkipStep(m)
    s = SkipStep(opt)
    grads_for(m, 0)
    with pytest.raises(ValueError, match="needs this step's loss"):
        s.step()
    with pytest.raises(ValueError, match="one-element"):
        s.step(loss=torch.ones(3))
    with pytest.raises(ValueError, match="loss must be a number"):
        s.step(loss="1.0")
    with pytest.raises(ValueError, match="betas"):
        StableAdamW(m.parameters(), betas=(0.9, 1.5))
    with pytest.raises(ValueError, match="eps"):
        StableAdamW(m.parameters(), eps=0)


SHAPES = [(7,), (3, 5), (129, 3), (2, 3, 17)]


ADAM_BACKENDS = backend_params("adam_step_", devices=("cpu",))


@pytest.mark.parametrize("backend,device", ADAM_BACKENDS)
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_stable_adamw_equals_the_reference_float64(wd, backend, device):
    torch.manual_seed(0)
    ps = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    ref = [p.clone() for p in ps]
    mv = [(torch.zeros_like(p), torch.zeros_like(p)) for p in ps]
    opt = StableAdamW(ps, lr=0.05, betas=(0.9, 0.99), eps=1e-8, weight_decay=wd, backend=backend)
    clipped = 0
    for t in range(1, 7):
        for i, p in enumerate(ps):
            # a gradient that grows: its RMS against v_hat exceeds 1 (clipping active) on some steps
            p.grad = torch.randn(p.shape, dtype=torch.float64) * (1 + 10 * (t == 4))
            lr_before = None
            g = p.grad.clone()
            stable_adamw_reference(ref[i], g, *mv[i], t, 0.05, (0.9, 0.99), 1e-8, wd)
            v_hat = mv[i][1] / (1 - 0.99 ** t)
            clipped += bool((g * g / v_hat).mean() > 1)
        opt.step()
        for p, r in zip(ps, ref):
            torch.testing.assert_close(p, r, rtol=1e-13, atol=1e-15)
    assert clipped > 0


@pytest.mark.parametrize("backend,device", ADAM_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_stable_adamw_every_float_dtype(dtype, backend, device):
    torch.manual_seed(0)
    ps = [torch.randn(s).to(dtype) for s in SHAPES]
    ref = [p.clone() for p in ps]  # the reference in float64 math, its p, m, v rounded to dtype after each step
    mv = [(torch.zeros_like(p), torch.zeros_like(p)) for p in ref]
    opt = StableAdamW(ps, lr=0.05, weight_decay=0.1, backend=backend)
    for t in range(1, 4):
        for i, p in enumerate(ps):
            p.grad = (torch.randn(p.shape) * (1 + 10 * (t == 2))).to(dtype)
            r64, m64, v64 = ref[i].double(), mv[i][0].double(), mv[i][1].double()
            stable_adamw_reference(r64, p.grad.double(), m64, v64, t, 0.05, (0.9, 0.999), 1e-8, 0.1)
            for a, b in zip((ref[i], *mv[i]), (r64, m64, v64)):
                a.copy_(b)
        opt.step()
        for p, r in zip(ps, ref):
            if backend == "triton" and dtype == torch.bfloat16:
                # Triton's interpreter truncates fp32 -> bf16 stores (a GPU rounds to nearest; measured: every
                # difference from the cpp backend is toward zero, one bf16 ulp per step): 3 steps, 4 ulps
                torch.testing.assert_close(p, r, rtol=3.2e-2, atol=1e-3)
            else:
                torch.testing.assert_close(p, r)  # dtype-specific default tolerances


# --------------------------------------------------------------------------------------------------
# the skip flag folded into our optimizers' fused kernels (SPEC 7.1) and update clipping on them (SPEC 7.2)


def scripted_short(n=90):
    """For window=32: a loss spike at 25 (with NaN/inf gradients there), a NaN loss at 45 (OLMo-core's rule:
    skipped while the NaN is in the window, 45-76), a norm spike at 85."""
    g = torch.Generator().manual_seed(7)
    loss = (3 - torch.arange(n, dtype=torch.float64) / n + 0.05 * torch.randn(n, generator=g, dtype=torch.float64))
    norm = 1 + 0.1 * torch.rand(n, generator=g, dtype=torch.float64)
    loss, norm = loss.tolist(), norm.tolist()
    loss[25] += 5.0
    loss[45] = math.nan
    norm[85] = 50.0
    return loss, norm


X = torch.randn(16, 7, generator=torch.Generator().manual_seed(3))
FULL = dict(method="jvp", every=1)  # the radius measured every step: a run that never saw a skipped step agrees
OURS = {
    "StableAdamW": lambda m: StableAdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
    "RadiusAdamW": lambda m: RadiusAdamW(m.parameters(), lr=0.5, model=m, **FULL),
    "RadiusAdamW-clip": lambda m: RadiusAdamW(m.parameters(), lr=0.5, model=m, update_clip=True, **FULL),
    "RadiusSGD": lambda m: RadiusSGD(m.parameters(), lr=5.0, momentum=0.9, model=m, **FULL),
    "RadiusController(Adam)": lambda m: RadiusController(torch.optim.Adam(m.parameters(), lr=0.5), m, **FULL),
    "RadiusController(SGD)": lambda m: RadiusController(torch.optim.SGD(m.parameters(), lr=5.0, momentum=0.9), m,
                                                        **FULL),
    "SAdam-probes=0": lambda m: SAdam(m, lr=1e-2, probes=0),
    "SAdam-clip-probes=0": lambda m: SAdam(m, lr=1e-2, probes=0, update_clip=True),
    "PSSAdamW": lambda m: PSSAdamW(m, lr=1e-2, trigger=None),
    "PSSAdamW-clip": lambda m: PSSAdamW(m, lr=1e-2, trigger=None, update_clip=True),
}


def ours_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 3))


def forward_and_grads(m, i, nonfinite=False):
    """A training forward (the radius controllers and S-Adam capture its inputs), then scripted gradients."""
    m(X)
    grads_for(m, i)
    if nonfinite:
        ps = list(m.parameters())
        ps[0].grad.view(-1)[0] = math.nan
        ps[-1].grad.view(-1)[-1] = math.inf


def all_state(opt):
    """Every tensor of an optimizer's per-parameter state, in a fixed order."""
    return [t for p in opt.param_groups[0]["params"] for t in opt.state[p].values() if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("name", list(OURS))
def test_skipstep_folds_the_flag_into_our_kernels(name, monkeypatch):
    """SkipStep on our optimizers takes the kernel path (its snapshot copy is never made: the helper raises),
    skips exactly the steps OLMo-core's rule skips, leaves parameters and every state tensor (step counters
    included) bit-identical on a skipped step, NaN/inf gradients included, and takes on a kept step exactly the
    step of the same optimizer that was never shown the skipped steps."""
    def no_snapshot(self):
        raise AssertionError("SkipStep copied parameters and state: the snapshot path ran")

    monkeypatch.setattr(SkipStep, "_snapshot", no_snapshot)
    loss, norm = scripted_short()
    rule = OlmoRule(window=32)
    want = [rule.step(l, n) for l, n in zip(loss, norm)]
    assert want[25] and want[45] and want[85] and not want[24] and not want[80] and sum(want) == 2 + 33
    m1, m2 = ours_model(), ours_model()
    plain, inner = OURS[name](m1), OURS[name](m2)
    assert inner.accepts_skip
    wrapped = SkipStep(inner, window=32)
    for i, (l, n) in enumerate(zip(loss, norm)):
        forward_and_grads(m2, i, nonfinite=i == 25)
        before = [p.detach().clone() for p in m2.parameters()] + [t.clone() for t in all_state(inner)]
        wrapped.step(loss=torch.tensor(l), grad_norm=torch.tensor(n))
        assert bool(wrapped.last.skipped) == want[i], i
        after = list(m2.parameters()) + all_state(inner)
        if want[i]:
            assert len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after)), i
            assert inner.skip_flag is None
        else:
            forward_and_grads(m1, i)
            plain.step()
            ours, theirs = list(m2.parameters()) + all_state(inner), list(m1.parameters()) + all_state(plain)
            assert all(torch.equal(a, b) for a, b in zip(ours, theirs)), i
    steps = [s["step"] for s in inner.state.values() if "step" in s]
    assert all(int(s) == len(want) - sum(want) for s in steps)  # the counters advanced on kept steps only


def test_skipped_step_keeps_the_radius_and_the_inner_state():
    """RadiusAdamW at its defaults (fd every 8th step and after a capped one): a skipped step still probes on
    the host's schedule but keeps the last rho; PSSAdamW (torch's fused AdamW inside): a skipped step leaves the
    EMA and decides no smoothing."""
    m = ours_model()
    opt = RadiusAdamW(m.parameters(), lr=0.5, model=m)
    for i in range(10):
        forward_and_grads(m, i)
        opt.step()
    rho = opt.last.rho.clone()
    before = [p.detach().clone() for p in m.parameters()]
    forward_and_grads(m, 10, nonfinite=True)
    opt.skip_flag = torch.ones((), dtype=torch.float64)
    opt.step()
    opt.skip_flag = None
    assert torch.equal(opt.last.rho, rho) and all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    forward_and_grads(m, 11)
    opt.step()
    assert all(torch.isfinite(p).all() for p in m.parameters())

    m = ours_model()
    pss = PSSAdamW(m, lr=1e-2, every=1, warmup=0)
    assert pss.accepts_skip
    for i in range(5):
        forward_and_grads(m, i)
        pss.step()
    pss.flush()
    ema, count = pss.ema, pss.trigger_count
    before = [p.detach().clone() for p in m.parameters()]
    forward_and_grads(m, 5, nonfinite=False)
    for p in m.parameters():
        p.grad.mul_(100)  # a spike the ratio test would fire on
    pss.skip_flag = torch.ones(())
    pss.step()
    pss.skip_flag = None
    pss.flush()
    assert pss.ema == ema and pss.trigger_count == count
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


CLIP_REF = {
    "StableAdamW": lambda ps, be: StableAdamW(ps, lr=0.05, betas=(0.9, 0.99), weight_decay=0.1, backend=be),
    "SAdam(update_clip)": lambda ps, be: SAdam(ps, lr=0.05, betas=(0.9, 0.99), weight_decay=0.1, probes=0,
                                               update_clip=True, backend=be),
    "PSSAdamW(update_clip)": lambda ps, be: PSSAdamW(ps, lr=0.05, betas=(0.9, 0.99), weight_decay=0.1, trigger=None,
                                                     update_clip=True, backend=be),
}


@pytest.mark.parametrize("backend,device", ADAM_BACKENDS)
@pytest.mark.parametrize("name", list(CLIP_REF))
def test_update_clip_optimizers_equal_the_reference_float64(name, backend, device):
    torch.manual_seed(0)
    shapes = SHAPES + [(1,), (257, 3)]
    ps = [torch.randn(s, dtype=torch.float64) for s in shapes]
    ref = [p.clone() for p in ps]
    mv = [(torch.zeros_like(p), torch.zeros_like(p)) for p in ps]
    opt = CLIP_REF[name](ps, backend)
    clipped = 0
    for t in range(1, 7):
        for i, p in enumerate(ps):
            p.grad = torch.randn(p.shape, dtype=torch.float64) * (1 + 10 * (t == 4) * (i % 2))
            g = p.grad.clone()
            stable_adamw_reference(ref[i], g, *mv[i], t, 0.05, (0.9, 0.99), 1e-8, 0.1)
            clipped += bool((g * g / (mv[i][1] / (1 - 0.99 ** t))).mean() > 1)
        opt.step()
        for p, r in zip(ps, ref):
            torch.testing.assert_close(p, r, rtol=1e-13, atol=1e-15)
    assert clipped > 0


@pytest.mark.parametrize("backend,device", ADAM_BACKENDS)
@pytest.mark.parametrize("name", list(CLIP_REF))
def test_update_clip_with_a_tiny_eps_and_zero_gradients_float32(name, backend, device):
    """eps = 1e-25 (the grokking setting) squares to 0 in float32: a gradient element that is 0 over a v that is 0
    made update clipping's RMS 0 / 0 = NaN, which poisoned every parameter (or, in the C++ fused step, left the
    tensor unclipped). The floor is now the smallest normal number: float32 steps equal the float64 reference
    (where eps^2 = 1e-50 is representable), clipping binding on the tensor with the zero column."""
    from stabkernels.optim.skipstep import stable_adamw_reference
    gen = torch.Generator().manual_seed(3)
    shapes = [(5, 7), (11,)]
    ps = [torch.randn(s, generator=gen).to(device) for s in shapes]
    ref = [p.double().cpu() for p in ps]
    mv = [(torch.zeros_like(r), torch.zeros_like(r)) for r in ref]
    opt = CLIP_REF[name](ps, backend)
    for group in opt.param_groups:
        group["eps"] = 1e-25
    clipped = 0
    for t in range(1, 6):
        for i, p in enumerate(ps):
            g = torch.randn(p.shape, generator=gen) * (1 + 30 * (t == 4))
            if i == 0:
                g[:, 0] = 0  # never a gradient: v stays 0 there
            p.grad = g.to(device)
            g64 = g.double()
            stable_adamw_reference(ref[i], g64, *mv[i], t, 0.05, (0.9, 0.99), 1e-25, 0.1)
            v_hat = mv[i][1] / (1 - 0.99 ** t)
            clipped += i == 0 and bool((g64 * g64 / v_hat.clamp_min(1e-50)).mean() > 1)
        opt.step()
        for p, r in zip(ps, ref):
            assert torch.isfinite(p).all()
            torch.testing.assert_close(p.cpu().double(), r, rtol=1e-5, atol=1e-6)
    assert clipped > 0


@pytest.mark.parametrize("backend,device", ADAM_BACKENDS)
def test_radius_adamw_update_clip(backend, device):
    """RadiusAdamW(update_clip=True): with the control inactive (r large) it is StableAdamW (float64 reference);
    with RMS <= 1 everywhere (gradients shrinking) it is RadiusAdamW without clipping bit for bit, the control
    binding; with a gradient spike the radius is measured along the clipped step (tau shrinks)."""
    m = nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 3)).double()
    x = X.double()
    ps = list(m.parameters())
    ref = [p.detach().clone() for p in ps]
    mv = [(torch.zeros_like(p), torch.zeros_like(p)) for p in ps]
    opt = RadiusAdamW(ps, lr=0.05, betas=(0.9, 0.99), weight_decay=0.1, model=m, r=1e9, update_clip=True,
                      backend=backend, **FULL)
    gen = torch.Generator().manual_seed(2)
    for t in range(1, 6):
        m(x)
        for i, p in enumerate(ps):
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64) * (1 + 10 * (t == 3) * (i % 2))
            stable_adamw_reference(ref[i], p.grad.clone(), *mv[i], t, 0.05, (0.9, 0.99), 1e-8, 0.1)
        opt.step()
        assert float(opt.last.scale) == 1.0
        for p, r in zip(ps, ref):
            torch.testing.assert_close(p.detach(), r, rtol=1e-13, atol=1e-15)

    runs = []
    for clip in (False, True):
        mm = ours_model()
        o = RadiusAdamW(mm.parameters(), lr=2.0, model=mm, update_clip=clip, backend=backend, **FULL)
        for t in range(6):
            mm(X)
            grads_for(mm, t)
            for p in mm.parameters():
                p.grad.mul_(0.3 ** t)  # g^2 / v_hat < 1: RMS <= 1, nothing clipped
            o.step()
            assert float(o.last.scale) < 1  # the control binds
        runs.append([p.detach().clone() for p in mm.parameters()] + all_state(o))
    assert all(torch.equal(a, b) for a, b in zip(*runs))

    taus = []
    for clip in (False, True):
        mm = ours_model()
        o = RadiusAdamW(mm.parameters(), lr=2.0, model=mm, update_clip=clip, backend=backend, **FULL)
        for t in range(4):
            mm(X)
            grads_for(mm, t)
            if t == 3:
                for p in mm.parameters():
                    p.grad.mul_(50)
            o.step()
        taus.append(float(o.last.tau))
    assert taus[1] < 0.75 * taus[0]


def test_sadam_update_clip_damps_the_step_not_the_decay():
    """SAdam(update_clip=True) with probes: p <- p (1 - lr_t wd) - lr_t alpha u, lr_t = lr / max(1, RMS), alpha
    the step's damping (from the report); float64."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 3)).double()
    x = X.double()
    ps = list(m.parameters())
    opt = SAdam(m, lr=0.05, weight_decay=0.1, sigma=0.05, damping=5.0, update_clip=True,
                loss_fn=lambda out, *a: out.square().mean())
    mv = [(torch.zeros_like(p), torch.zeros_like(p)) for p in ps]
    for t in range(1, 5):
        loss = m(x).square().mean()
        opt.zero_grad()
        loss.backward()
        for i, p in enumerate(ps):
            p.grad.mul_(1 + 20 * (t == 3) * (i % 2))
        before = [p.detach().clone() for p in ps]
        grads = [p.grad.clone() for p in ps]
        opt.step(loss=loss.detach())
        alpha = float(opt.last.alpha[0])
        assert alpha < 1
        for i, p in enumerate(ps):
            b1, b2, eps, wd = 0.9, 0.999, 1e-8, 0.1
            g, (mm, vv) = grads[i], mv[i]
            mm.lerp_(g, 1 - b1)
            vv.mul_(b2).addcmul_(g, g, value=1 - b2)
            bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
            rms = (g * g / torch.clamp_min(vv / bc2, eps * eps)).mean().sqrt()
            lr_t = 0.05 / torch.clamp_min(rms, 1.0)
            want = before[i] * (1 - lr_t * wd) - lr_t * alpha * ((mm / bc1) / (vv.sqrt() / math.sqrt(bc2) + eps))
            torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-14)


RESUME = {
    "SkipStep(StableAdamW)": lambda m: SkipStep(StableAdamW(m.parameters(), lr=1e-2), window=32),
    "SkipStep(RadiusAdamW-clip)": lambda m: SkipStep(RadiusAdamW(m.parameters(), lr=0.5, model=m, update_clip=True),
                                                     window=32),
    "SkipStep(PSSAdamW-clip)": lambda m: SkipStep(PSSAdamW(m, lr=1e-2, every=5, update_clip=True), window=32),
    "SkipStep(SAdam-clip)": lambda m: SkipStep(SAdam(m, lr=1e-2, update_clip=True, sigma=0.05,
                                                     loss_fn=lambda out, *a: out.square().mean()), window=32),
}


@pytest.mark.parametrize("name", list(RESUME))
def test_state_dict_resumes_bit_identically_on_the_kernel_path(name):
    loss, norm = scripted_short()
    m1 = ours_model()
    o1 = RESUME[name](m1)
    for i in range(35):
        forward_and_grads(m1, i)
        o1.step(loss=loss[i], grad_norm=norm[i])
    if hasattr(o1.optimizer, "flush"):
        o1.optimizer.flush()
    m2 = ours_model(seed=1)
    o2 = RESUME[name](m2)
    m2.load_state_dict(copy.deepcopy(m1.state_dict()))
    o2.load_state_dict(copy.deepcopy(o1.state_dict()))
    skipped = 0
    for i in range(35, 90):
        for m, o in ((m1, o1), (m2, o2)):
            forward_and_grads(m, i, nonfinite=i == 45)
            o.step(loss=loss[i], grad_norm=norm[i])
        assert torch.equal(o1.last.skipped, o2.last.skipped)
        skipped += bool(o1.last.skipped)
    assert skipped >= 2
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(all_state(o1.optimizer), all_state(o2.optimizer)))

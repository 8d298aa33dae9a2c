"""SkipStep (OLMo-core's skip rule, on the device) and StableAdamW (update clipping) against references."""
import copy
import math

import pytest
import torch
from torch import nn

from stabkernels.optim import SkipStep, StableAdamW
from stabkernels.optim.skipstep import stable_adamw_reference


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


@pytest.mark.parametrize("kind", ["loss", "norm", "nonfinite", "early", "none"])
@pytest.mark.parametrize("window", [128, 40])
def test_skips_exactly_the_steps_olmo_skips(kind, window):
    loss, norm = scripted(kind)
    ref = OlmoRule(window)
    want = [ref.step(l, n) for l, n in zip(loss, norm)]
    m, opt = model_opt(lambda ps: SkipStep(torch.optim.SGD(ps, lr=0.1), window=window))
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


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_stable_adamw_equals_the_reference_float64(wd):
    torch.manual_seed(0)
    ps = [torch.randn(s, dtype=torch.float64) for s in SHAPES]
    ref = [p.clone() for p in ps]
    mv = [(torch.zeros_like(p), torch.zeros_like(p)) for p in ps]
    opt = StableAdamW(ps, lr=0.05, betas=(0.9, 0.99), eps=1e-8, weight_decay=wd)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_stable_adamw_every_float_dtype(dtype):
    torch.manual_seed(0)
    ps = [torch.randn(s).to(dtype) for s in SHAPES]
    ref = [p.clone() for p in ps]  # the reference in float64 math, its p, m, v rounded to dtype after each step
    mv = [(torch.zeros_like(p), torch.zeros_like(p)) for p in ref]
    opt = StableAdamW(ps, lr=0.05, weight_decay=0.1)
    for t in range(1, 4):
        for i, p in enumerate(ps):
            p.grad = (torch.randn(p.shape) * (1 + 10 * (t == 2))).to(dtype)
            r64, m64, v64 = ref[i].double(), mv[i][0].double(), mv[i][1].double()
            stable_adamw_reference(r64, p.grad.double(), m64, v64, t, 0.05, (0.9, 0.999), 1e-8, 0.1)
            for a, b in zip((ref[i], *mv[i]), (r64, m64, v64)):
                a.copy_(b)
        opt.step()
        for p, r in zip(ps, ref):
            torch.testing.assert_close(p, r)  # dtype-specific default tolerances

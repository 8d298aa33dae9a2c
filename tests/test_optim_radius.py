"""Radius controller: the unit proposal is torch's own step, the cap holds, buffers stay untouched, the fused
optimizers match the wrapper, state resumes, and the digits spike protocol (short) is survived."""
import copy
import io
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from stabkernels import update
from stabkernels.demo import digits
from stabkernels.optim import RadiusAdamW, RadiusController, RadiusSGD

from .helpers import backend_params, count_forwards


def mlp(seed=0, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(10, 24)] + ([nn.BatchNorm1d(24)] if bn else []) + [nn.ReLU(), nn.Linear(24, 5)]
    return nn.Sequential(*layers)


def batch(seed=0, n=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 10, generator=g), torch.randint(0, 5, (n,), generator=g)


def backward(model, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()


OPTIMIZERS = [
    ("SGD", lambda ps: torch.optim.SGD(ps, lr=1.0)),
    ("SGD-momentum", lambda ps: torch.optim.SGD(ps, lr=1.0, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    ("SGD-nesterov", lambda ps: torch.optim.SGD(ps, lr=1.0, momentum=0.8, nesterov=True, maximize=True)),
    ("Adam", lambda ps: torch.optim.Adam(ps, lr=1.0, weight_decay=0.01)),
    ("Adam-amsgrad", lambda ps: torch.optim.Adam(ps, lr=1.0, amsgrad=True, betas=(0.8, 0.9))),
    ("AdamW", lambda ps: torch.optim.AdamW(ps, lr=1.0, weight_decay=0.0)),
]


@pytest.mark.parametrize("name,make", OPTIMIZERS, ids=[o[0] for o in OPTIMIZERS])
def test_unit_proposal_is_the_step_torch_applies_at_lr_1(name, make):
    # The controller takes the wrapped optimizer's step itself (fused, on its state): u must be the step torch
    # applies at lr 1 and the state it leaves must be torch's.
    model = mlp()
    opt = make(model.parameters())
    ctrl = RadiusController(opt, model)
    for step in range(3):
        backward(model, *batch(step))
        shadow = copy.deepcopy(model)
        shadow_opt = make(shadow.parameters())
        shadow_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # else both share the moment tensors
        for p, q in zip(model.parameters(), shadow.parameters()):
            q.grad = p.grad.clone()
        before = [p.detach().clone() for p in shadow.parameters()]
        shadow_opt.step()
        params = [p for p in opt.param_groups[0]["params"] if p.grad is not None]
        us = [torch.empty_like(p) for p in params]
        group = opt.param_groups[0]
        sums = ctrl._propose(group, params, us, ctrl._setup_state(group, params), None)
        for u, b, a in zip(us, before, shadow.parameters()):
            torch.testing.assert_close(u, b - a.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sums, torch.stack([u.pow(2).sum() for u in us]), rtol=1e-5, atol=0)
        mine, torchs = opt.state_dict()["state"], shadow_opt.state_dict()["state"]
        assert mine.keys() == torchs.keys()
        for i in torchs:
            assert mine[i].keys() == torchs[i].keys()
            for k in torchs[i]:
                torch.testing.assert_close(mine[i][k], torchs[i][k], rtol=1e-6, atol=1e-7)
        update.apply_update_(params, us, 1.0, 0.0)  # the step at lr 1, for the next round
        for p, q in zip(model.parameters(), shadow.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["jvp", "fd"])
def test_cap_mode_never_exceeds_r_rho_and_set_mode_equals_it(method):
    model = mlp()
    ctrl = RadiusController(torch.optim.Adam(model.parameters(), lr=100.0), model, r=0.5, method=method)
    model2 = mlp()
    setter = RadiusController(torch.optim.SGD(model2.parameters(), lr=1e-6), model2, mode="set", method=method)
    for step in range(4):
        for m, c in ((model, ctrl), (model2, setter)):
            x, y = batch(step)
            backward(m, x, y)
            before = torch.cat([p.detach().flatten().clone() for p in m.parameters()])
            c.step(x)
            moved = (torch.cat([p.detach().flatten() for p in m.parameters()]) - before).norm().item()
            rho = float(c.last.rho)
            if c is ctrl:
                assert moved <= 0.5 * rho * (1 + 1e-4) and float(c.last.scale) < 1
            else:
                assert moved == pytest.approx(rho, rel=1e-4) and float(c.last.scale) > 1
    assert ctrl.param_groups[0]["lr"] == 100.0  # restored after each step


def test_cap_does_not_bind_at_small_lr_and_schedulers_work():
    a, b = mlp(), mlp()
    plain = torch.optim.Adam(a.parameters(), lr=1e-4)
    ctrl = RadiusController(torch.optim.Adam(b.parameters(), lr=1e-4), b)
    sched = torch.optim.lr_scheduler.StepLR(ctrl, step_size=1, gamma=0.5)
    sched_plain = torch.optim.lr_scheduler.StepLR(plain, step_size=1, gamma=0.5)
    for step in range(4):
        x, y = batch(step)
        backward(a, x, y)
        backward(b, x, y)
        plain.step()
        ctrl.step(x)
        sched.step()
        sched_plain.step()
        assert float(ctrl.last.scale) == 1.0
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert ctrl.param_groups[0]["lr"] == pytest.approx(1e-4 / 16)


@pytest.mark.parametrize("method", ["jvp", "fd"])
def test_buffers_flags_untouched_and_inputs_captured(method):
    model = mlp(bn=True)
    ctrl = RadiusController(torch.optim.SGD(model.parameters(), lr=10.0, momentum=0.9), model, samples=8,
                            method=method)
    x, y = batch(0)
    backward(model, x, y)  # a training forward: its inputs are captured, BN statistics move once
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ctrl.step()  # no inputs: the captured batch, first 8 rows
    after = model.state_dict()
    for k in state:
        if "running" in k or "num_batches" in k:
            assert torch.equal(after[k], state[k]), k
    assert model.training and all(m.training for m in model.modules())
    fresh = mlp()
    c2 = RadiusController(torch.optim.SGD(fresh.parameters(), lr=0.1), fresh, capture_inputs=False)
    backward(fresh, x, y)
    with pytest.raises(RuntimeError, match="no inputs"):
        c2.step()


def dropout_bn_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 24), nn.BatchNorm1d(24), nn.ReLU(), nn.Dropout(0.3), nn.Linear(24, 5))


@pytest.mark.parametrize("make", [
    lambda m, **kw: RadiusController(torch.optim.Adam(m.parameters(), lr=1e-2), m, method="fd", **kw),
    lambda m, **kw: RadiusAdamW(m.parameters(), lr=1e-2, model=m, method="fd", **kw),
], ids=["wrapper", "fused"])
def test_train_probe_mode_reuses_the_training_forward(make):
    """probe_mode='train' with fd: the training forward's logits and dropout masks are reused, so the step
    runs one extra forward; the radius equals the one measured with two train-mode forwards; buffers, flags
    and the global RNG are untouched."""
    x, y = batch(0)
    models = [dropout_bn_mlp(), dropout_bn_mlp()]
    reuse = make(models[0], probe_mode="train")
    twice = make(models[1], probe_mode="train", capture_inputs=False)
    rhos = []
    for model, opt in zip(models, (reuse, twice)):
        torch.manual_seed(7)  # the same dropout masks in both training forwards
        rng = torch.get_rng_state()
        backward(model, x, y)
        after_forward = torch.get_rng_state()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        with count_forwards(model) as calls:
            if opt is reuse:
                opt.step(x)  # the training forward's own inputs
            else:
                # no capture: two forwards, both from the current RNG state, set to the training forward's
                with torch.random.fork_rng(devices=[]):
                    torch.set_rng_state(rng)
                    opt.step(x)
        assert len(calls) == (1 if opt is reuse else 2)
        rhos.append(opt.last.rho)
        if opt is reuse:
            assert torch.equal(torch.get_rng_state(), after_forward)
            after = model.state_dict()
            assert all(torch.equal(after[k], state[k]) for k in state if "running" in k or "num_batches" in k)
            assert all(m.training for m in model.modules())
    torch.testing.assert_close(rhos[0], rhos[1], rtol=1e-6, atol=0)


def test_default_probe_mode_is_eval_for_jvp_and_train_for_fd():
    """fd (the default method) defaults to the training-mode function and reuses the training forward: one
    extra forward."""
    model = dropout_bn_mlp()
    assert RadiusAdamW(model.parameters(), model=model).probe.method == "fd"
    assert RadiusAdamW(model.parameters(), model=model).probe.probe_mode == "train"
    assert RadiusAdamW(model.parameters(), model=model, method="jvp").probe.probe_mode == "eval"
    assert RadiusController(torch.optim.Adam(model.parameters()), model, method="jvp").probe.probe_mode == "eval"
    opt = RadiusAdamW(model.parameters(), lr=1e-2, model=model, method="fd")
    assert opt.probe.probe_mode == "train"
    assert RadiusAdamW(model.parameters(), model=model, method="fd", probe_mode="eval").probe.probe_mode == "eval"
    x, y = batch(0)
    backward(model, x, y)
    with count_forwards(model) as calls:
        opt.step()
    assert len(calls) == 1 and torch.isfinite(opt.last.rho)


def test_train_probe_capture_never_breaks_the_users_forward():
    class DictOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(10, 5)

        def forward(self, x):
            return {"scores": self.lin(x)}  # not a key the probe knows ("logits" would be read)

    model = DictOut()
    opt = RadiusAdamW(model.parameters(), lr=1e-2, model=model, method="fd", probe_mode="train")
    x, y = batch(0)
    loss = F.cross_entropy(model(x)["scores"], y)  # the hook cannot read this output: no error here
    loss.backward()
    assert opt.probe.captured_logits is None
    with pytest.raises(TypeError, match="logits_fn"):
        opt.step()


def test_train_probe_mode_does_not_reuse_autocast_logits():
    model = dropout_bn_mlp()
    opt = RadiusAdamW(model.parameters(), lr=1e-2, model=model, method="fd", probe_mode="train")
    x, y = batch(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    assert opt.probe.captured_logits is None
    with count_forwards(model) as calls:
        opt.step()
    assert len(calls) == 2 and torch.isfinite(opt.last.rho)


def test_unsupported_optimizer_and_bad_options():
    model = mlp()
    with pytest.raises(TypeError, match="supports torch.optim.SGD, Adam and AdamW"):
        RadiusController(torch.optim.RMSprop(model.parameters()), model)
    with pytest.raises(ValueError, match="mode"):
        RadiusController(torch.optim.SGD(model.parameters(), lr=0.1), model, mode="clip")
    with pytest.raises(ValueError, match="r must be"):
        RadiusController(torch.optim.SGD(model.parameters(), lr=0.1), model, r=0)
    with pytest.raises(ValueError, match="method"):
        RadiusController(torch.optim.SGD(model.parameters(), lr=0.1), model, method="exact")
    with pytest.raises(ValueError, match="probe_mode"):
        RadiusAdamW(model.parameters(), model=model, probe_mode="training")


def test_nan_radius_gives_a_zero_length_step():
    model = mlp()
    ctrl = RadiusController(torch.optim.SGD(model.parameters(), lr=1.0), model)
    x, y = batch(0)
    backward(model, x, y)
    before = [p.detach().clone() for p in model.parameters()]
    x_bad = x.clone()
    x_bad[0, 0] = float("nan")
    ctrl.step(x_bad)
    assert math.isnan(float(ctrl.last.rho)) and float(ctrl.last.scale) == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


FUSED = [("AdamW", lambda ps, **kw: torch.optim.AdamW(ps, lr=5.0, weight_decay=0.1, amsgrad=True),
          lambda ps, model, **kw: RadiusAdamW(ps, lr=5.0, weight_decay=0.1, amsgrad=True, model=model, **kw)),
         ("SGD", lambda ps, **kw: torch.optim.SGD(ps, lr=50.0, momentum=0.9, nesterov=True, weight_decay=0.01),
          lambda ps, model, **kw: RadiusSGD(ps, lr=50.0, momentum=0.9, nesterov=True, weight_decay=0.01,
                                            model=model, **kw))]


@pytest.mark.parametrize("backend,device", backend_params("adam_step_", devices=("cpu",)))
@pytest.mark.parametrize("method", ["jvp", "fd"])
@pytest.mark.parametrize("name,make_torch,make_fused", FUSED, ids=[f[0] for f in FUSED])
def test_fused_optimizers_match_the_wrapper(backend, device, method, name, make_torch, make_fused):
    # Finite differences in fp32 carry ~1e-3 relative noise (rounding / eps), which tiny parameter
    # differences between the two update paths expose; in float64 both paths must agree tightly.
    dtype = torch.float64 if method == "fd" else torch.float32
    a, b = mlp().to(dtype), mlp().to(dtype)
    ctrl = RadiusController(make_torch(a.parameters()), a, method=method, backend=backend)
    fused = make_fused(b.parameters(), model=b, method=method, backend=backend)
    for step in range(6):
        x, y = batch(step)
        x = x.to(dtype)
        backward(a, x, y)
        backward(b, x, y)
        ctrl.step(x)
        fused.step(x)
        assert float(fused.last.scale) < 1  # the control binds
        torch.testing.assert_close(fused.last.rho.double(), ctrl.last.rho.double(), rtol=1e-3, atol=0)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_fused_step_reads_nothing_back_to_the_host(monkeypatch):
    model = mlp()
    opt = RadiusAdamW(model.parameters(), lr=5.0, model=model)
    x, y = batch(0)
    backward(model, x, y)

    def no_item(self):
        raise AssertionError("a .item() on the fused path")

    monkeypatch.setattr(torch.Tensor, "item", no_item)
    monkeypatch.setattr(torch.Tensor, "__float__", no_item)
    opt.step(x)
    monkeypatch.undo()
    assert float(opt.last.scale) < 1


def test_fused_head_path_matches_full_tangents():
    a = mlp()
    b = copy.deepcopy(a)
    full = RadiusAdamW(a.parameters(), lr=5.0, model=a, method="jvp", every=1)
    fused = RadiusAdamW(b.parameters(), lr=5.0, model=b, head=b[-1], every=1)
    for step in range(3):
        x, y = batch(step)
        backward(a, x, y)
        backward(b, x, y)
        full.step(x)
        fused.step(x)
        torch.testing.assert_close(fused.last.rho, full.last.rho, rtol=1e-4, atol=0)


@pytest.mark.parametrize("every", [3, 100])
@pytest.mark.parametrize("kind", ["wrapper", "fused"])
def test_state_dict_round_trip_resumes_identically(kind, every):
    # every=100: capped steps re-measure at backed-off gaps, whose state must resume too
    def make(model):
        if kind == "wrapper":
            return RadiusController(torch.optim.Adam(model.parameters(), lr=3.0), model, every=every)
        return RadiusAdamW(model.parameters(), lr=3.0, model=model, every=every)

    model = mlp()
    opt = make(model)
    for step in range(7):
        backward(model, *batch(step))
        opt.step(batch(step)[0])
    buf = io.BytesIO()
    torch.save({"m": model.state_dict(), "o": opt.state_dict()}, buf)
    for step in range(7, 12):
        backward(model, *batch(step))
        opt.step(batch(step)[0])
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    model2 = mlp(seed=5)
    model2.load_state_dict(saved["m"])
    opt2 = make(model2)
    opt2.load_state_dict(saved["o"])
    for step in range(7, 12):
        backward(model2, *batch(step))
        opt2.step(batch(step)[0])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))


def test_digits_spike_one_seed():
    """SPEC 2.5, one seed at base lr 1e-2 (lr x1000 from step 50): Adam collapses, the controller holds."""
    split = digits.load_digits_split(0)
    adam = digits.run("adam", digits.adam_factory, 1e-2, 0, split)
    ctrl = digits.run("radius", digits.radius_adam_factory, 1e-2, 0, split)
    assert adam.final_test_acc < 0.3
    assert ctrl.final_test_acc >= 0.9
    assert all(r > 0 for r in ctrl.rho) and len(ctrl.rho) == 200


def test_scratch_buffers_are_reused_and_follow_the_parameter():
    from stabkernels.optim._scratch import ScratchBuffers

    p, q = nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(3, 4))
    scratch = ScratchBuffers()
    s = scratch.like(p, torch.float32)
    assert scratch.like(p, torch.float32) is s and scratch.like(q, torch.float32) is not s
    assert s.shape == p.shape and s.is_contiguous()
    p.data = p.data.double()  # what model.double() does: same Parameter, new dtype
    s64 = scratch.like(p)
    assert s64.dtype == torch.float64 and s64 is not s
    p.data = torch.randn(5)
    assert scratch.like(p).shape == (5,)


def test_head_method_is_the_spread_of_the_heads_own_derivative():
    """method="head": rho = pi / max over rows of the spread of h dW^T + db along the unit direction, with h the
    training forward's features entering the head (float64: the formula, not a rounding tolerance)."""
    model = mlp().double()
    x, y = batch(0)
    x = x.double()
    ctrl = RadiusController(torch.optim.SGD(model.parameters(), lr=0.1), model, method="head", head=model[-1],
                            every=1)
    backward(model, x, y)
    grads = [p.grad.clone() for p in model.parameters()]
    h = model[:-1](x).detach()  # the features entering the head, at the parameters of the training forward
    with count_forwards(model) as calls:
        ctrl.step()
    assert calls == []  # the zero-probe mode runs no forward
    norm = torch.cat([g.flatten() for g in grads]).norm()
    z_dot = h @ (grads[-2] / norm).T + grads[-1] / norm
    rho = math.pi / (z_dot.max(dim=1).values - z_dot.min(dim=1).values).max()
    # the controller hands the probe the direction's scale 1/||u|| in float32 (for every method): 1e-7 relative
    torch.testing.assert_close(ctrl.last.rho, rho, rtol=2e-7, atol=0)
    assert ctrl.last.recomputed


def test_head_method_needs_the_head_and_fd_does_not_take_it():
    model = mlp()
    with pytest.raises(ValueError, match="head"):
        RadiusAdamW(model.parameters(), model=model, method="head")
    with pytest.raises(ValueError, match="method='fd'"):
        RadiusAdamW(model.parameters(), model=model, method="fd", head=model[-1])
    with pytest.raises(ValueError, match="reprobe_above"):
        RadiusAdamW(model.parameters(), model=model, reprobe_above=-1.0)
    with pytest.raises(ValueError, match="reprobe_budget"):
        RadiusAdamW(model.parameters(), model=model, reprobe_budget=-1)


def expected_measurements(reports, every, stable=0.25, budget=None) -> list[bool]:
    """The measurement schedule on the host, from each step's report: the first step, every ``every``-th, and
    the step after a capped one once the gap since the last measurement has passed (at most ``budget`` of these
    between two scheduled measurements); the gap doubles (up to ``every``) while a new radius is within
    ``stable`` of the one before and is 1 otherwise."""
    out, gap, last, changed, rho, used = [], 1, 0, None, None, 0
    for t, rep in enumerate(reports, 1):
        capped_before = t > 1 and float(reports[t - 2].ratio) >= 1
        probe = rho is None or t % every == 0
        if probe:
            used = 0
        else:
            if not capped_before:
                gap = 1
            elif t - last >= gap and (budget is None or used < budget):
                probe = True
                used += 1
        if probe:
            if changed is not None:
                gap = 1 if changed else min(2 * gap, every)
            last = t
            new = float(rep.rho)
            if rho is not None:
                changed = not abs(new / rho - 1) <= stable
            rho = new
        out.append(probe)
    return out


@pytest.mark.parametrize("reprobe_above", [1.0, None])
def test_radius_measured_again_after_capped_steps_with_back_off(reprobe_above):
    """every=100: the radius is measured on the first step, then (by default) after capped steps, at gaps that
    double while the radius holds still; uncapped steps and reprobe_above=None reuse it. (No budget here: the
    budget's own test is below.)"""
    for lr, capped in ((100.0, True), (1e-6, False)):
        model = mlp()
        opt = RadiusAdamW(model.parameters(), lr=lr, model=model, every=100, reprobe_above=reprobe_above,
                          reprobe_budget=None)
        reports = []
        for step in range(12):
            backward(model, *batch(step % 4))
            opt.step()
            reports.append(opt.last)
        measured = [r.recomputed for r in reports]
        assert all(float(r.scale) < 1 for r in reports) == capped
        if reprobe_above is None or not capped:
            assert measured == [True] + [False] * 11
        else:
            assert measured == expected_measurements(reports, 100)
            assert 2 < sum(measured) < 12  # re-measured, and backed off


@pytest.mark.parametrize("every", [8, 16])
def test_reprobe_budget_bounds_the_measurements_of_a_persistently_capped_run(every):
    """At the defaults (reprobe_budget=3) a run capped on every step measures at most 1 + 3 times per ``every``
    steps, on the steps the host schedule names; the budget resets at each scheduled measurement."""
    model = mlp()
    opt = RadiusAdamW(model.parameters(), lr=100.0, model=model, every=every, method="jvp")  # budget: default
    reports = []
    for step in range(2 * every):
        backward(model, *batch(step % 4))
        opt.step()
        reports.append(opt.last)
    assert all(float(r.ratio) >= 1 for r in reports)
    measured = [r.recomputed for r in reports]
    assert measured == expected_measurements(reports, every, budget=3)
    for w in range(2):  # each window: steps w*every+1 .. (w+1)*every, the scheduled one last
        assert sum(measured[w * every:(w + 1) * every]) <= 1 + 3 + (w == 0)
    assert sum(measured) < sum(expected_measurements(reports, every, budget=None))  # the budget bound

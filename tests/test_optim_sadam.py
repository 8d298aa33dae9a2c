"""SAdam against a plain-PyTorch implementation of SPEC 3.1, its edge cases, and the OrthoGrad wrapper."""
import io
import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from stabkernels import directional
from stabkernels.optim import OrthoGrad, SAdam
from stabkernels.optim.sadam import lgi


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def batch(t, n=24, dtype=torch.float32):
    g = torch.Generator().manual_seed(100 + t)
    return torch.randn(n, 8, generator=g).to(dtype), torch.randint(0, 4, (n,), generator=g)


def sadam_step(model, opt, t):
    x, y = batch(t, dtype=next(model.parameters()).dtype)
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step(probe_closure=lambda: F.cross_entropy(model(x), y), loss=loss)


def spec_reference(model, steps, lr, wd, betas, eps, k, sigma, lam, seed):
    """SPEC 3.1 written out with torch ops, the directions from the reference stream."""
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    counter = 0
    b1, b2 = betas
    dtype = params[0].dtype
    for t in range(1, steps + 1):
        x, y = batch(t - 1, dtype=dtype)
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            L0 = loss.double()
            D = []
            for _ in range(k):
                d = directional.random_directions(params, seed, counter, backend="torch")
                counter += 1
                moved = {n: p + torch.tensor(sigma, dtype=dtype) * dd for n, p, dd in zip(names, params, d)}
                D.append((F.cross_entropy(functional_call(model, moved, (x,)), y).double() - L0) / sigma)
            D = torch.stack(D)
            rho = D.var(unbiased=True) / (D.pow(2).mean() + 1e-6) if k > 1 else torch.zeros((), dtype=torch.float64)
            alpha = torch.exp(-lam * rho.clamp_max(10.0)).to(dtype)
            bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
            for p, g, mm, vv in zip(params, grads, m, v):
                p.mul_(1 - lr * wd)
                mm.lerp_(g, 1 - b1)
                vv.mul_(b2).addcmul_(g, g, value=1 - b2)
                p.sub_(alpha * lr * (mm / bc1) / (vv.sqrt() / math.sqrt(bc2) + eps))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_sadam_equals_the_spec_over_20_steps(dtype):
    """In float64 the two must agree to 1e-10 (same algorithm, same directions). In float32 torch's own
    lerp_/addcmul_ round differently from any re-implementation and Adam amplifies last-bit differences where
    v is tiny, so agreement is to float32 rounding (1e-6 relative to the weights' scale)."""
    ref, ours = mlp().to(dtype), mlp().to(dtype)
    spec_reference(ref, 20, 1e-2, 1e-2, (0.9, 0.999), 1e-8, 8, 0.01, 2.0, seed=42)
    opt = SAdam(ours, lr=1e-2, seed=42)
    for t in range(20):
        sadam_step(ours, opt, t)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=0, atol=1e-6 * 3)
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, **tol)
    assert opt.probe_counter == 160


@pytest.mark.parametrize("kw", [dict(probes=0), dict(damping=0.0)], ids=["probes=0", "damping=0"])
def test_without_probing_it_is_adamw(kw):
    a, b = mlp(), mlp()
    plain = torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=1e-2)
    opt = SAdam(b.parameters(), lr=1e-2, weight_decay=1e-2, probe_mode="train", **kw)
    for t in range(10):
        x, y = batch(t)
        for m, o in ((a, plain), (b, opt)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
        plain.step()
        opt.step()  # no closure needed
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_lgi_by_hand_and_bounds():
    D = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    assert lgi(D).item() == pytest.approx((5 / 3) / (7.5 + 1e-6))
    assert lgi(torch.tensor([3.0], dtype=torch.float64)).item() == 0.0  # k = 1
    assert lgi(torch.tensor([1.0, float("nan"), 3.0], dtype=torch.float64)).item() == pytest.approx(2 / (5 + 1e-6))
    g = torch.Generator().manual_seed(0)
    for k in (2, 3, 8):
        for _ in range(50):
            r = lgi(torch.randn(k, generator=g, dtype=torch.float64) * 10 + torch.randn((), generator=g)).item()
            assert 0 <= r <= k / (k - 1) + 1e-12
    model = mlp()
    opt = SAdam(model, lr=1e-3, probes=3)
    for t in range(5):
        sadam_step(model, opt, t)
        rho, alpha = opt.last.rho[0].item(), opt.last.alpha[0].item()
        assert 0 <= rho <= 1.5 and alpha == pytest.approx(math.exp(-2.0 * rho))


class BNDropNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 4))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("probe_mode", ["eval", "train"])
def test_probes_leave_params_buffers_and_flags_bit_identical(probe_mode):
    torch.manual_seed(0)
    model = BNDropNet()
    model.net[1].eval()  # a submodule deliberately in eval mode
    opt = SAdam(model, lr=0.0, weight_decay=0.0, probe_mode=probe_mode)
    x, y = batch(0)
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    storages = [p.data_ptr() for p in model.parameters()]
    calls = []
    opt.step(probe_closure=lambda: (calls.append(1), F.cross_entropy(model(x), y))[1], loss=loss)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == flags
    assert [p.data_ptr() for p in model.parameters()] == storages
    # eval mode re-evaluates the loss at theta (the given one is a training-mode loss); train mode reuses it
    assert len(calls) == 8 + (1 if probe_mode == "eval" else 0)


def test_nonfinite_probe_is_dropped_and_never_reaches_weights_or_damping():
    model = mlp()
    opt = SAdam(model, lr=1e-2, probes=4)
    x, y = batch(0)
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    calls = []

    def closure():
        calls.append(1)
        out = F.cross_entropy(model(x), y)
        return out * float("inf") if len(calls) == 3 else out

    opt.step(probe_closure=closure)  # the count is read back without a synchronisation: the warning comes a step later
    D = opt.last.D[0]
    assert torch.isnan(D).sum() == 1 and int(opt.last.dropped[0]) == 1
    assert torch.isfinite(opt.last.rho[0]) and torch.isfinite(opt.last.alpha[0])
    assert opt.last.rho[0].item() == pytest.approx(lgi(D[torch.isfinite(D)]).item())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.warns(RuntimeWarning, match="step 1 dropped probes"):
        opt.step(probe_closure=closure)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(probe_closure=closure)  # step 2 dropped none


def test_state_dict_round_trip_reproduces_the_directions():
    model = mlp()
    opt = SAdam(model, lr=1e-2, probes=3, seed=7)
    for t in range(3):
        sadam_step(model, opt, t)
    buf = io.BytesIO()
    torch.save({"m": model.state_dict(), "o": opt.state_dict()}, buf)
    for t in range(3, 6):
        sadam_step(model, opt, t)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    model2 = mlp(seed=9)
    model2.load_state_dict(saved["m"])
    opt2 = SAdam(model2, lr=1e-2, probes=3, seed=123)  # the saved seed and counter win
    opt2.load_state_dict(saved["o"])
    for t in range(3, 6):
        sadam_step(model2, opt2, t)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))
    assert opt2.probe_counter == opt.probe_counter == 18


def test_param_groups_override_hyper_parameters():
    model = mlp()
    opt = SAdam([{"params": model[0].parameters()},
                 {"params": model[2].parameters(), "probes": 2, "sigma": 0.05, "damping": 1.0, "lr": 0.0}],
                lr=1e-2, probes=4, model=model)
    before = [p.clone() for p in model[2].parameters()]
    sadam_step(model, opt, 0)
    assert [d.numel() for d in opt.last.D] == [4, 2]
    assert opt.last.alpha[1].item() == pytest.approx(math.exp(-1.0 * min(opt.last.rho[1].item(), 10)))
    assert all(torch.equal(a, b) for a, b in zip(before, model[2].parameters()))  # lr 0 group did not move


def test_sadam_errors():
    model = mlp()
    with pytest.raises(ValueError, match="probe_mode='eval' needs the model"):
        SAdam(model.parameters())
    with pytest.raises(ValueError, match="probe_mode"):
        SAdam(model, probe_mode="test")
    with pytest.raises(ValueError, match="sigma"):
        SAdam(model, sigma=0.0)
    x, y = batch(0)
    opt = SAdam(model, capture_inputs=False)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="needs the probe losses: pass step.probe_closure"):
        opt.step()
    opt = SAdam(model)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="has no .loss; pass SAdam.*loss_fn"):
        opt.step()  # captured, but the output is logits and there is no loss_fn
    with pytest.raises(TypeError, match="probe_closure"):  # the old-style loss closure, passed positionally
        opt.step(lambda: F.cross_entropy(model(x), y))


class LossOutput(nn.Module):
    """A model whose forward, given labels, returns an output with .loss and .logits (like Hugging Face's)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, labels=None):
        logits = self.net(x)
        return SimpleNamespace(logits=logits, loss=None if labels is None else F.cross_entropy(logits, labels))


def test_three_ways_to_the_probe_losses_give_the_same_step():
    x, y = batch(0)
    ways = {
        "probe_closure": (lambda m: SAdam(m, lr=1e-2, seed=5, capture_inputs=False),
                          lambda m, opt: opt.step(probe_closure=lambda: m(x, labels=y).loss)),
        "captured .loss": (lambda m: SAdam(m, lr=1e-2, seed=5), lambda m, opt: opt.step()),
        "loss_fn": (lambda m: SAdam(m, lr=1e-2, seed=5, loss_fn=lambda out, x, labels: F.cross_entropy(out.logits, labels)),
                    lambda m, opt: opt.step()),
    }
    results = {}
    for name, (make, step) in ways.items():
        model = LossOutput(mlp())
        opt = make(model)
        for _ in range(2):
            opt.zero_grad()
            out = model(x, labels=y) if name != "loss_fn" else model(x, y)
            (out.loss if out.loss is not None else F.cross_entropy(out.logits, y)).backward()
            step(model, opt)
        assert opt.probe_counter == 16 and float(opt.last.rho[0]) > 0
        results[name] = [p.detach().clone() for p in model.parameters()]
    for name in ("captured .loss", "loss_fn"):
        assert all(torch.equal(a, b) for a, b in zip(results["probe_closure"], results[name])), name


def test_torch_style_closure_runs_forward_and_backward_once():
    x, y = batch(0)
    a, b = mlp(), mlp()
    opt_a, opt_b = SAdam(a, lr=1e-2, seed=1, loss_fn=lambda out, x: F.cross_entropy(out, y)), SAdam(b, lr=1e-2, seed=1)
    calls = []

    def closure():  # what Lightning and LBFGS-style loops pass
        calls.append(1)
        opt_a.zero_grad()
        loss = F.cross_entropy(a(x), y)
        loss.backward()
        return loss

    returned = opt_a.step(closure)
    opt_b.zero_grad()
    loss = F.cross_entropy(b(x), y)
    loss.backward()
    opt_b.step(probe_closure=lambda: F.cross_entropy(b(x), y))
    assert len(calls) == 1 and returned.requires_grad and returned.grad_fn is not None
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_orthograd_wrapper_steps_orthogonally_with_the_gradient_norm():
    model = mlp()
    opt = OrthoGrad(torch.optim.SGD(model.parameters(), lr=1.0))
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)
    x, y = batch(0)
    F.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    norms = [p.grad.norm().item() for p in model.parameters()]
    opt.step()
    for w, p, n in zip(before, model.parameters(), norms):
        step = (w - p.detach()).double()
        assert abs((step * w.double()).sum().item()) < 1e-5 * step.norm().item() * w.double().norm().item()
        assert step.norm().item() == pytest.approx(n, rel=1e-5)
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.5


def test_default_seed_is_reproducible_and_leaves_the_global_rng_alone():
    model = mlp()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = SAdam(model)
    assert torch.equal(state, torch.get_rng_state())  # dropout masks and data order are not shifted
    torch.manual_seed(123)
    assert SAdam(model).seed == a.seed
    torch.manual_seed(124)
    assert SAdam(model).seed != a.seed

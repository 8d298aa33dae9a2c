"""tangent_spread_linear (every backend), softmax_radius against root finding, and tangent_logits."""
import math

import mpmath
import pytest
import torch
from torch import nn

import stabkernels as sk
from stabkernels.spread import row_spread_reference, tangent_spread_linear_reference

from .helpers import FLOAT_DTYPES, backend_params, count_forwards

TS_BACKENDS = backend_params("tangent_spread_linear")


def head_inputs(n, d, v, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)  # noqa: E731
    return r(n, d), r(n, d), r(v, d) * 0.3, r(v, d) * 0.3, r(v)


@pytest.mark.parametrize("backend,device", TS_BACKENDS)
@pytest.mark.parametrize("shape", [(1, 1, 1), (37, 40, 70), (129, 17, 300)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("parts", ["full", "no_weight_dot", "no_bias_dot"])
def test_tangent_spread_equals_materialise_then_reduce(backend, device, shape, parts):
    h, hd, w, wd, bd = head_inputs(*shape, device=device)
    wd = None if parts == "no_weight_dot" else wd
    bd = None if parts == "no_bias_dot" else bd
    got = sk.tangent_spread_linear(h, hd, w, wd, bd, "none", backend=backend)
    want = tangent_spread_linear_reference(*(None if t is None else t.double() for t in (h, hd, w, wd, bd)))
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend,device", TS_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_tangent_spread_dtypes_and_layouts(backend, device, dtype):
    h, hd, w, wd, bd = head_inputs(33, 24, 50, dtype=dtype, device=device)
    h = h.t().contiguous().t()  # column-major
    w = torch.cat([w, w], dim=1)[:, ::2]  # strided
    got = sk.tangent_spread_linear(h, hd, w, wd, bd, "none", backend=backend)
    want = tangent_spread_linear_reference(h.double(), hd.double(), w.double(), wd.double(), bd.double())
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # numpy, inside the Triton interpreter
@pytest.mark.parametrize("backend,device", TS_BACKENDS)
def test_tangent_spread_reductions_and_nan(backend, device):
    h, hd, w, wd, bd = head_inputs(40, 16, 90, device=device)
    per_row = tangent_spread_linear_reference(h, hd, w, wd, bd)
    torch.testing.assert_close(sk.tangent_spread_linear(h, hd, w, wd, bd, backend=backend), per_row.max(),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sk.tangent_spread_linear(h, hd, w, wd, bd, 0.9, backend=backend),
                               torch.quantile(per_row, 0.9), rtol=1e-5, atol=1e-5)
    hd[3, 0] = float("nan")
    got = sk.tangent_spread_linear(h, hd, w, wd, bd, "none", backend=backend)
    assert torch.isnan(got[3]) and torch.isfinite(got[torch.arange(40) != 3]).all()


def test_tangent_spread_errors():
    h, hd, w, wd, bd = head_inputs(4, 3, 5)
    with pytest.raises(ValueError, match="h_dot must have h's shape"):
        sk.tangent_spread_linear(h, hd[:2], w)
    with pytest.raises(ValueError, match=r"weight must be \(V, 3\)"):
        sk.tangent_spread_linear(h, hd, w.t())
    with pytest.raises(ValueError, match="bias_dot must have 5"):
        sk.tangent_spread_linear(h, hd, w, wd, bd[:2])
    with pytest.raises(ValueError, match="share one dtype"):
        sk.tangent_spread_linear(h, hd, w.double())
    with pytest.raises(TypeError, match="integer"):
        sk.tangent_spread_linear(h, hd, w.long())


# ----------------------------------------------------------------------------------------------
# softmax radius


def nearest_partition_zero(z, a, starts=16):
    """Smallest |t| of a complex zero of Z(t) = sum_k exp(z_k + a_k t), by Newton iterations (mpmath) from
    rings of starting points at radii 1/4 to 64: independent of the closed forms."""
    f = lambda t: mpmath.fsum(mpmath.exp(zk + ak * t) for zk, ak in zip(z, a))  # noqa: E731
    best = math.inf
    for j in range(starts):
        for rr in (0.25, 1.0, 4.0, 16.0, 64.0):
            t0 = rr * mpmath.exp(2j * mpmath.pi * j / starts)
            try:
                root = mpmath.findroot(f, t0, tol=1e-20, maxsteps=200)
            except (ValueError, ZeroDivisionError):
                continue
            if abs(f(root)) < 1e-12 * mpmath.fsum(abs(mpmath.exp(zk + ak * root)) for zk, ak in zip(z, a)):
                best = min(best, float(abs(root)))
    return best


def test_binary_radius_is_the_nearest_complex_zero():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 2, generator=g, dtype=torch.float64) * 2
    a = torch.randn(4, 2, generator=g, dtype=torch.float64)
    got = sk.softmax_radius(a, z, mode="binary", reduce="none")
    for i in range(4):
        want = nearest_partition_zero(z[i].tolist(), a[i].tolist())
        assert got[i].item() == pytest.approx(want, rel=1e-8)
    assert sk.softmax_radius(a, z, mode="binary").item() == pytest.approx(got.min().item())


def test_multiclass_bound_lies_below_the_nearest_zero():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4, 3, generator=g, dtype=torch.float64)
    a = torch.randn(4, 3, generator=g, dtype=torch.float64)
    bound = sk.softmax_radius(a, reduce="none")
    for i in range(4):
        assert bound[i].item() <= nearest_partition_zero(z[i].tolist(), a[i].tolist()) + 1e-9
    torch.testing.assert_close(bound, math.pi / row_spread_reference(a))


def test_radius_reductions_temperature_and_top2():
    a = torch.tensor([[0.0, 1.0, 3.0], [0.0, 0.5, 0.0], [2.0, 0.0, 0.0]])
    z = torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0], [0.0, 1.0, 0.0]])
    spreads = torch.tensor([3.0, 0.5, 2.0])
    torch.testing.assert_close(sk.softmax_radius(a), torch.tensor(math.pi / 3))
    torch.testing.assert_close(sk.softmax_radius(a, reduce="none"), math.pi / spreads)
    torch.testing.assert_close(sk.softmax_radius(a, reduce=0.5), math.pi / torch.quantile(spreads, 0.5))
    torch.testing.assert_close(sk.softmax_radius(a, temperature=2.0), torch.tensor(2 * math.pi / 3))
    # top2 with the top class: row 0 top=1 (z 2), runner-up=0 (z 1): sqrt(1 + pi^2) / |1 - 0|
    r = sk.softmax_radius(a, z, mode="top2", reduce="none")
    assert r[0].item() == pytest.approx(math.sqrt(1 + math.pi ** 2) / 1.0)
    # with labels: row 0 label 2 (z 0) vs runner-up class 1 (z 2): sqrt(4 + pi^2) / |3 - 1|
    r = sk.softmax_radius(a, z, torch.tensor([2, 2, 1]), mode="top2", reduce="none")
    assert r[0].item() == pytest.approx(math.sqrt(4 + math.pi ** 2) / 2.0)
    assert torch.isfinite(sk.softmax_radius(torch.zeros(3, 4)))  # zero tangent: huge but finite


def test_radius_errors():
    a = torch.randn(3, 4)
    with pytest.raises(ValueError, match="mode"):
        sk.softmax_radius(a, mode="exact")
    with pytest.raises(ValueError, match="needs the logits"):
        sk.softmax_radius(a, mode="top2")
    with pytest.raises(ValueError, match="two classes"):
        sk.softmax_radius(a, a, mode="binary")
    with pytest.raises(ValueError, match="temperature"):
        sk.softmax_radius(a, temperature=0)
    with pytest.raises(ValueError, match="labels"):
        sk.softmax_radius(a, a, torch.ones(3), mode="top2")


# ----------------------------------------------------------------------------------------------
# tangent logits


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 16),
                                  nn.BatchNorm1d(16), nn.Tanh())
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.body(x))


def direction_for(model, seed=0, dtype=None):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype or p.dtype)
            for n, p in model.named_parameters()}


def unit_direction_for(model, dtype):
    d = direction_for(model, dtype=dtype)
    norm = math.sqrt(sum(t.double().pow(2).sum().item() for t in d.values()))
    return {n: t / norm for n, t in d.items()}


def test_jvp_is_exact_on_a_linear_model():
    model = nn.Linear(7, 4)
    x = torch.randn(9, 7)
    d = direction_for(model)
    got = sk.tangent_logits(model, x, d)
    torch.testing.assert_close(got, x @ d["weight"].T + d["bias"])


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 2e-2)])
def test_jvp_and_finite_differences_agree(dtype, tol):
    torch.manual_seed(0)
    model = BNNet().to(dtype)
    model.train()
    with torch.no_grad():  # give BatchNorm non-trivial running statistics
        for _ in range(3):
            model(torch.randn(32, 6, dtype=dtype))
    x = torch.randn(20, 6, dtype=dtype)
    d = unit_direction_for(model, dtype)
    jvp = sk.tangent_logits(model, x, d, "jvp")
    fd = sk.tangent_logits(model, x, d, "fd", eps=1e-7 if dtype == torch.float64 else 1e-3)
    torch.testing.assert_close(fd, jvp, rtol=tol, atol=tol * jvp.abs().max().item())


@pytest.mark.parametrize("method", ["jvp", "fd"])
def test_tangent_logits_leaves_model_exactly_as_it_was(method):
    torch.manual_seed(0)
    model = BNNet()
    model.train()
    model(torch.randn(32, 6))
    model.body[5].eval()  # a module deliberately in eval mode inside a training model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    logits, tan = sk.tangent_logits(model, torch.randn(10, 6), direction_for(model), method, return_logits=True)
    assert tan.shape == logits.shape == (10, 5)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == flags


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 2e-2)])
def test_train_mode_tangents_replay_the_dropout_masks_and_protect_buffers(dtype, tol):
    torch.manual_seed(0)
    model = BNNet().to(dtype).train()  # batch statistics and dropout are live
    x = torch.randn(20, 6, dtype=dtype)
    d = unit_direction_for(model, dtype)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = sk.tangent.rng_state(x.device)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    jvp = sk.tangent_logits(model, x, d, "jvp", eval=False, rng_state=rng)
    fd = sk.tangent_logits(model, x, d, "fd", eps=1e-7 if dtype == torch.float64 else 1e-3, eval=False, rng_state=rng)
    torch.testing.assert_close(fd, jvp, rtol=tol, atol=tol * jvp.abs().max().item())
    assert torch.equal(torch.get_rng_state(), before)  # the global stream did not move
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(m.training for m in model.modules())
    # the train-mode function differs from the eval-mode one (dropout, batch statistics)
    assert not torch.allclose(jvp, sk.tangent_logits(model, x, d, "jvp"), rtol=1e-2, atol=1e-3)
    # logits= reuses a forward run from the same RNG state: one forward fewer, the same tangent
    with sk.tangent.replay_rng(rng, x.device):
        logits = model(x).detach()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items() if "running" not in k
               and "num_batches" not in k)
    with count_forwards(model) as calls:
        reused = sk.tangent_logits(model, x, d, "fd", eps=1e-7 if dtype == torch.float64 else 1e-3, eval=False,
                                   rng_state=rng, logits=logits)
    assert len(calls) == 1
    torch.testing.assert_close(reused, fd, rtol=0, atol=0)
    with pytest.raises(ValueError, match="method='fd'"):
        sk.tangent_logits(model, x, d, "jvp", logits=logits)
    with pytest.raises(ValueError, match="shape"):
        sk.tangent_logits(model, x, d, "fd", eval=False, logits=logits[:3])


def test_tangent_logits_inputs_logits_fn_and_direction_forms():
    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)

        def forward(self, x, scale=1.0):
            return {"logits": self.lin(x) * scale}

    model = Wrapped()
    x = torch.randn(2, 5, 3)  # (B, T, d): rows become B*T
    d = [torch.ones(4, 3), None]  # aligned with parameters; the bias does not move
    fn = lambda out: out["logits"]  # noqa: E731
    a1 = sk.tangent_logits(model, (x, 2.0), d, logits_fn=fn)
    a2 = sk.tangent_logits(model, {"x": x, "scale": 2.0}, {"lin.weight": torch.ones(4, 3)}, logits_fn=fn)
    assert a1.shape == (10, 4)
    torch.testing.assert_close(a1, a2)
    torch.testing.assert_close(a1, 2.0 * x.reshape(10, 3).sum(1, keepdim=True).expand(10, 4))
    with pytest.raises(ValueError, match="not a parameter"):
        sk.tangent_logits(model, x, {"nope": torch.ones(1)}, logits_fn=fn)
    with pytest.raises(ValueError, match="shape"):
        sk.tangent_logits(model, x, {"lin.weight": torch.ones(3)}, logits_fn=fn)
    # a dict's "logits" (and an object's .logits, like Hugging Face's ModelOutput) need no logits_fn
    torch.testing.assert_close(sk.tangent_logits(model, (x, 2.0), d), a1)
    model.forward = lambda x, scale=1.0: {"scores": model.lin(x) * scale}  # noqa: E731
    with pytest.raises(TypeError, match="logits_fn"):
        sk.tangent_logits(model, x, {"lin.weight": torch.ones(4, 3)})
    with pytest.raises(ValueError, match="method"):
        sk.tangent_logits(model, x, d, method="reverse", logits_fn=fn)


def test_fused_head_path_matches_materialised_tangents():
    torch.manual_seed(0)
    model = BNNet().eval()
    x = torch.randn(25, 6)
    d = direction_for(model)
    h, h_dot = sk.tangent_features(model, x, d, model.head)
    assert h.shape == (25, 16) and model.head(h).shape == (25, 5)  # the head was restored
    spread = sk.tangent_spread_linear(h, h_dot, model.head.weight.detach(), d["head.weight"], d["head.bias"])
    torch.testing.assert_close(spread, sk.row_spread(sk.tangent_logits(model, x, d)), rtol=1e-5, atol=1e-5)

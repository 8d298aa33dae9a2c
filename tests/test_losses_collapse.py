"""The fused losses where the target dominates (issue 31, "softmax collapse"): float32 logits whose target probability
rounds to 1 in float32. A loss computed as log S - log s_y, or a target gradient as p_y - 1, is then exactly 0; ours
must stay within 1e-4 (relative per row; normwise per gradient row) of a float64 computation, on every backend."""
import pytest
import torch

from stabkernels.losses import stablemax_cross_entropy, stablemax_s

from .helpers import backend_params

CE_BACKENDS = backend_params("cross_entropy_z_loss")
SM_BACKENDS = backend_params("stablemax_cross_entropy")
SHAPES = [(37, 113), (9, 2053)]  # 2053: several Triton blocks; targets in the SIMD body and in the scalar tail
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
RTOL = 1e-4


def rtol(dtype):
    """float64 logits: float64 math, which no such row collapses; held to float64 accuracy instead."""
    return 1e-12 if dtype == torch.float64 else RTOL


def targets(n, v, g):
    y = torch.randint(0, v, (n,), generator=g)
    y[:4] = torch.tensor([0, v - 1, v - 2, v // 2])  # the first and last columns, the tail, the middle
    return y


def softmax_data(n, v, seed=0):
    """Per row an offset b in [-20, 20]; the target's logit b, the others b - gap - [0, 4), gap in [17, 30]."""
    g = torch.Generator().manual_seed(seed)
    y = targets(n, v, g)
    b = torch.rand(n, 1, generator=g, dtype=torch.float64) * 40 - 20
    gap = 17 + 13 * torch.rand(n, 1, generator=g, dtype=torch.float64)
    z = b - gap - 4 * torch.rand(n, v, generator=g, dtype=torch.float64)
    z.scatter_(1, y[:, None], b)
    return z.float(), y


def stablemax_data(n, v, seed=0):
    """The target's logit in [1e4, 1e6], the others in [-1e7, -1e5] (log-uniform)."""
    g = torch.Generator().manual_seed(seed)
    y = targets(n, v, g)
    z = -(10 ** (5 + 2 * torch.rand(n, v, generator=g, dtype=torch.float64)))
    z.scatter_(1, y[:, None], 10 ** (4 + 2 * torch.rand(n, 1, generator=g, dtype=torch.float64)))
    return z.float(), y


def others(z, y):
    """z with the target column dropped: (N, V - 1)."""
    keep = torch.ones_like(z, dtype=torch.bool).scatter_(1, y[:, None], False)
    return z[keep].reshape(len(z), -1)


def softmax_reference(z, y, c):
    """float64 ce, z-loss and gradient per row, by autograd of ce = log1p(sum_{j != y} exp(z_j - z_y)) (exact
    arithmetic, and accurate in float64 for these rows: no max is needed with the target the largest)."""
    z = z.double().requires_grad_()
    zy = z.gather(1, y[:, None])
    log_S = torch.log1p(torch.exp(others(z, y) - zy).sum(1))  # log S - z_y
    lse = zy[:, 0] + log_S
    ce, zl = log_S, c * lse * lse
    (grad,) = torch.autograd.grad((ce + zl).sum(), z)
    return ce.detach(), zl.detach(), grad


def stablemax_reference(z, y):
    """float64 loss and gradient per row, by autograd of log1p(sum_{j != y} s(z_j) / s(z_y))."""
    z = z.double().requires_grad_()
    loss = torch.log1p(stablemax_s(others(z, y)).sum(1) / stablemax_s(z.gather(1, y[:, None]))[:, 0])
    (grad,) = torch.autograd.grad(loss.sum(), z)
    return loss.detach(), grad


def rel_err(got, want):
    """Largest relative error of a row value."""
    return ((got.double() - want).abs() / want.abs()).max().item()


def normwise_err(got, want):
    """Largest normwise relative error of a gradient row."""
    return ((got.double() - want).norm(dim=1) / want.norm(dim=1)).max().item()


def check_grad(grad, want, dtype):
    if dtype in (torch.float32, torch.float64):
        assert normwise_err(grad, want) < rtol(dtype)
    else:  # stored in 16 bits: the float64 gradient rounded to dtype, up to one unit in its last place
        ulp = torch.finfo(dtype).eps
        tiny = torch.finfo(dtype).smallest_normal * ulp  # the smallest subnormal
        torch.testing.assert_close(grad.double(), want.to(dtype).double(), rtol=ulp, atol=tiny)


def collapsed(z, y, p):
    """The rows whose target probability is exactly 1 in float32."""
    return p(z.float()).gather(1, y[:, None])[:, 0] == 1


@pytest.mark.parametrize("backend,device", CE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("c", [0.0, 1e-3])
def test_softmax_cross_entropy_does_not_collapse(backend, device, dtype, shape, c):
    z, y = softmax_data(*shape)
    z = z.to(dtype)
    assert collapsed(z, y, lambda x: torch.softmax(x, 1)).float().mean() > 0.5  # the regime: most rows collapse
    grad = torch.empty_like(z, device=device)
    one = torch.ones((), dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device)
    ce, zl = torch.ops.stabkernels.cross_entropy_z_loss(z.to(device), y.to(device), grad, one, c, -100, None, 0.0, 0.0, backend)
    want_ce, want_zl, want_grad = softmax_reference(z, y, c)
    assert rel_err(ce.cpu(), want_ce) < rtol(dtype)
    if c:
        assert rel_err(zl.cpu(), want_zl) < rtol(dtype)
    check_grad(grad.cpu(), want_grad, dtype)


@pytest.mark.parametrize("backend,device", SM_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)  # float16 cannot hold 1e5
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_stablemax_cross_entropy_does_not_collapse(backend, device, dtype, shape):
    z, y = stablemax_data(*shape)
    z = z.to(dtype)
    p = lambda x: stablemax_s(x) / stablemax_s(x).sum(1, keepdim=True)  # noqa: E731
    assert collapsed(z, y, p).float().mean() > 0.5
    grad = torch.empty_like(z, device=device)
    one = torch.ones((), dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device)
    loss = torch.ops.stabkernels.stablemax_cross_entropy(z.to(device), y.to(device), grad, one, -100, None, 0.0, 0.0, backend)
    want, want_grad = stablemax_reference(z, y)
    assert rel_err(loss.cpu(), want) < rtol(dtype)
    check_grad(grad.cpu(), want_grad, dtype)


@pytest.mark.parametrize("backend,device", CE_BACKENDS)
def test_the_public_functions_do_not_collapse(backend, device):
    """Through the autograd functions, mean reduction: the loss and the gradient the logits receive."""
    import stabkernels as sk

    z, y = softmax_data(37, 113)
    x = z.to(device).requires_grad_()
    loss, _ = sk.cross_entropy_z_loss(x, y.to(device), z_coef=0.0, backend=backend)
    loss.backward()
    want, _, want_grad = softmax_reference(z, y, 0.0)
    assert abs(loss.item() / want.mean().item() - 1) < RTOL
    assert normwise_err(x.grad.cpu(), want_grad / len(y)) < RTOL
    z, y = stablemax_data(37, 113)
    x = z.to(device).requires_grad_()
    sk.stablemax_cross_entropy(x, y.to(device), backend=backend).backward()
    want, want_grad = stablemax_reference(z, y)
    assert normwise_err(x.grad.cpu(), want_grad / len(y)) < RTOL


def test_grokking_proxy_in_the_authors_setting_runs_short(tmp_path):
    """bench/proxies/grokking.py --authors (the long run is a script option), 20 steps: both runs, every column."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "proxies", "grokking.py")
    spec = importlib.util.spec_from_file_location("proxy_grokking_authors", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "authors.md"
    threads = torch.get_num_threads()
    try:
        assert module.main(["--authors", "--quick", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| 1") or line.startswith("| 2")]
    assert [r[0] for r in rows] == ["| 10", "| 20"]
    for r in rows:
        assert len(r) == 10 and float(r[4]) < RTOL and float(r[5]) < RTOL  # ours against float64


def test_the_authors_stablemax_loss_and_ours_agree_in_float64():
    """bench/proxies/grokking.py --authors trains with the authors' formula and with stablemax_cross_entropy: on the
    same float64 logits (moderate and collapse-scale), the two losses and their gradients agree to float64."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "proxies", "grokking.py")
    spec = importlib.util.spec_from_file_location("proxy_grokking_f64", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    g = torch.Generator().manual_seed(3)
    for scale in (1.0, 1e3):
        z = (torch.randn(64, 113, generator=g, dtype=torch.float64) * scale)
        y = torch.randint(0, 113, (64,), generator=g)
        a, b = z.clone().requires_grad_(), z.clone().requires_grad_()
        theirs, ours = module.authors_float64_loss(a, y), stablemax_cross_entropy(b, y)
        theirs.backward()
        ours.backward()
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-15)

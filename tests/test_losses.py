"""Fused losses against float64 references and autograd, per backend; in-place gradients; QKLayerNorm."""
import pytest
import torch
from torch.nn import functional as F

import stabkernels as sk
from stabkernels.benchmarks.cases import peak_extra_mb
from stabkernels.losses import stablemax_s

from .helpers import FLOAT_DTYPES, backend_params

CE_BACKENDS = backend_params("cross_entropy_z_loss")
SM_BACKENDS = backend_params("stablemax_cross_entropy")
SHAPES = [(1, 1), (7, 100), (257, 33)]


def data(n, v, dtype=torch.float64, device="cpu", seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, v, generator=g, dtype=torch.float64) * 3).to(device=device, dtype=dtype)
    y = torch.randint(0, v, (n,), generator=g).to(device)
    if ignore and n > 2:
        y[1] = -100
    return z, y


def ce_z_reference(z, y, c=1e-4, reduction="mean", ignore_index=-100):
    """The torch composition the fused op replaces, in float64."""
    valid = y != ignore_index
    ce = F.cross_entropy(z, y, reduction="none", ignore_index=ignore_index)
    zl = torch.where(valid, c * torch.logsumexp(z, 1) ** 2, torch.zeros_like(ce))
    rows = ce + zl
    if reduction == "none":
        return rows, zl
    if reduction == "sum":
        return rows.sum(), zl.sum()
    return rows.sum() / valid.sum(), zl.sum() / valid.sum()


def stablemax_reference(z, y, reduction="mean", ignore_index=-100):
    """SPEC 4 in float64, as the authors compute it."""
    valid = y != ignore_index
    yy = torch.where(valid, y, torch.zeros_like(y))
    s = stablemax_s(z.double())
    rows = torch.where(valid, -torch.log(s.gather(1, yy[:, None])[:, 0] / s.sum(1)), torch.zeros(len(y), dtype=torch.float64))
    return {"none": rows, "sum": rows.sum(), "mean": rows.sum() / valid.sum()}[reduction]


def tol(dtype):
    return {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]


@pytest.mark.parametrize("backend,device", CE_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_ce_z_loss_forward_and_gradient(backend, device, dtype, shape):
    z, y = data(*shape, dtype=dtype, device=device)
    x = z.clone().requires_grad_()
    loss, zl = sk.cross_entropy_z_loss(x, y, z_coef=1e-3, backend=backend)
    loss.backward()
    r = z.double().requires_grad_()
    want, want_z = ce_z_reference(r, y, c=1e-3)
    want.backward()
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and x.grad.dtype == dtype
    torch.testing.assert_close(loss.double(), want, rtol=tol(dtype), atol=tol(dtype))
    torch.testing.assert_close(zl.double(), want_z.detach(), rtol=tol(dtype), atol=tol(dtype))
    torch.testing.assert_close(x.grad.double(), r.grad, rtol=tol(dtype), atol=tol(dtype))


@pytest.mark.parametrize("backend,device", SM_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_stablemax_forward_and_gradient(backend, device, dtype, shape):
    z, y = data(*shape, dtype=dtype, device=device)
    x = z.clone().requires_grad_()
    loss = sk.stablemax_cross_entropy(x, y, backend=backend)
    loss.backward()
    r = z.double().requires_grad_()
    want = stablemax_reference(r, y)
    want.backward()
    torch.testing.assert_close(loss.double(), want, rtol=tol(dtype), atol=tol(dtype))
    torch.testing.assert_close(x.grad.double(), r.grad, rtol=tol(dtype), atol=tol(dtype))


@pytest.mark.parametrize("backend,device", CE_BACKENDS)
@pytest.mark.parametrize("loss", ["softmax", "stablemax"])
def test_a_strided_target_is_read_at_its_strides(backend, device, loss):
    """A target that is a strided view (every second label, say) gives what its contiguous copy gives: the kernels
    index target[i] as if contiguous, so they must be handed a contiguous one."""
    z, y = data(37, 45, device=device)
    wide = torch.stack([y, torch.zeros_like(y)], 1).reshape(-1)  # y at even positions, class 0 between
    assert not wide[::2].is_contiguous()
    for fn in (lambda t: sk.cross_entropy_z_loss(z, t, reduction="none", backend=backend)[0],
               lambda t: sk.stablemax_cross_entropy(z, t, reduction="none", backend=backend),
               lambda t: sk.linear_cross_entropy(z, torch.eye(45, dtype=z.dtype, device=device), t, loss=loss,
                                                 reduction="none", chunk_size=16, backend=backend)[0]):
        torch.testing.assert_close(fn(wide[::2]), fn(y), rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_gradcheck(reduction):
    z, y = data(6, 9)
    torch.autograd.gradcheck(lambda t: sk.cross_entropy_z_loss(t, y, 1e-2, reduction)[0], (z.clone().requires_grad_(),))
    torch.autograd.gradcheck(lambda t: sk.stablemax_cross_entropy(t, y, reduction), (z.clone().requires_grad_(),))
    got, got_z = sk.cross_entropy_z_loss(z, y, 1e-2, reduction)
    want, want_z = ce_z_reference(z, y, 1e-2, reduction)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_z, want_z)
    torch.testing.assert_close(sk.stablemax_cross_entropy(z, y, reduction), stablemax_reference(z, y, reduction))


def test_ignore_index_and_leading_dimensions():
    z, y = data(12, 7, ignore=False)
    y3 = y.reshape(3, 4).clone()
    y3[0, 1] = 5 - 6  # -1 used as ignore_index
    x = z.reshape(3, 4, 7).clone().requires_grad_()
    loss, _ = sk.cross_entropy_z_loss(x, y3, ignore_index=-1)
    loss.backward()
    assert torch.all(x.grad[0, 1] == 0)
    r = z.reshape(3, 4, 7).clone().requires_grad_()
    want, _ = ce_z_reference(r.reshape(12, 7), y3.reshape(12), ignore_index=-1)
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(x.grad, r.grad)
    all_ignored = torch.full((4,), -100)
    assert torch.isnan(sk.cross_entropy_z_loss(torch.randn(4, 3), all_ignored)[0])  # as F.cross_entropy


@pytest.mark.parametrize("backend,device", CE_BACKENDS)
@pytest.mark.parametrize("kind", ["ce_z", "stablemax"])
def test_inplace_backward_writes_the_gradient_into_the_logits(backend, device, kind):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(9, 5, generator=g).to(device)
    W = torch.randn(40, 5, generator=g).to(device).requires_grad_()
    y = torch.randint(0, 40, (9,), generator=g).to(device)
    fn = (lambda lg, inplace: sk.cross_entropy_z_loss(lg, y, inplace_backward=inplace, backend=backend)[0]) \
        if kind == "ce_z" else (lambda lg, inplace: sk.stablemax_cross_entropy(lg, y, inplace_backward=inplace,
                                                                             backend=backend))
    logits = h @ W.T  # non-leaf: the matmul's backward needs h and W, not its output
    fn(logits, False).backward()
    want = W.grad.clone()
    W.grad = None
    logits = h @ W.T
    ptr = logits.data_ptr()
    fn(logits, True).backward()
    torch.testing.assert_close(W.grad, want)
    assert logits.data_ptr() == ptr and not torch.equal(logits, h @ W.T)  # overwritten with the gradient


def test_no_gradient_without_requires_grad_and_errors():
    z, y = data(5, 6)
    loss, _ = sk.cross_entropy_z_loss(z, y)
    assert not loss.requires_grad
    with pytest.raises(TypeError, match="int64"):
        sk.cross_entropy_z_loss(z, y.int())
    with pytest.raises(ValueError, match="target must have shape"):
        sk.cross_entropy_z_loss(z, y[:3])
    with pytest.raises(ValueError, match="reduction"):
        sk.stablemax_cross_entropy(z, y, "avg")
    with pytest.raises(ValueError, match="z_coef"):
        sk.cross_entropy_z_loss(z, y, z_coef=-1.0)
    with pytest.raises(ValueError, match=r"\(N, V\)"):
        sk.cross_entropy_z_loss(z[0], y[0])
    bad = y.clone()
    bad[0] = 6
    for b in ("torch", "cpp"):
        if sk.backend.why_unavailable(b, "cpu") is None:
            with pytest.raises((IndexError, RuntimeError), match="out of range"):
                sk.cross_entropy_z_loss(z, bad, backend=b)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_opcheck(backend):
    if sk.backend.why_unavailable(backend, "cpu"):
        pytest.skip(sk.backend.why_unavailable(backend, "cpu"))
    z, y = data(6, 11, dtype=torch.float32)
    scale = torch.tensor(0.5)
    torch.library.opcheck(torch.ops.stabkernels.cross_entropy_z_loss.default,
                          (z, y, torch.empty_like(z), scale, 1e-4, -100, None, 0.0, 0.0, backend))
    torch.library.opcheck(torch.ops.stabkernels.stablemax_cross_entropy.default,
                          (z, y, torch.empty_like(z), scale, -100, None, 0.0, 0.0, backend))


def test_fused_loss_allocates_no_extra_n_by_v_buffer():
    n, v = 512, 32000  # one (N, V) fp32 buffer = 62.5 MB
    setup = (f"import torch.nn.functional as F; z = torch.randn({n}, {v}).requires_grad_(); "
             f"y = torch.randint(0, {v}, ({n},))")
    fused = peak_extra_mb(setup, "l, _ = stabkernels.cross_entropy_z_loss(z, y); l.backward()")
    torch_way = peak_extra_mb(setup, "l = F.cross_entropy(z, y) + 1e-4 * torch.logsumexp(z, 1).pow(2).mean(); "
                                     "l.backward()")
    one = n * v * 4 / 2 ** 20
    assert fused < 1.5 * one  # the gradient (which autograd hands to z.grad) and nothing of that size besides
    assert torch_way > fused + 0.5 * one


def test_qk_layernorm():
    ln = sk.nn.QKLayerNorm(8)
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 6, 8)
    qn, kn = ln(q, k)
    torch.testing.assert_close(qn, F.layer_norm(q, (8,), ln.q_norm.weight, ln.q_norm.bias))
    torch.testing.assert_close(kn.mean(-1), torch.zeros(2, 4, 6), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="head_dim=8"):
        ln(q, torch.randn(2, 4, 6, 7))


LOSS_CALLS = {
    "cross_entropy_z_loss": lambda x, y, w: sk.cross_entropy_z_loss(x, y, 1e-3)[0],
    "stablemax_cross_entropy": lambda x, y, w: sk.stablemax_cross_entropy(x, y),
    "linear_cross_entropy": lambda x, y, w: sk.linear_cross_entropy(x, w, y, z_coef=1e-3, chunk_size=4)[0],
}


@pytest.mark.parametrize("name", list(LOSS_CALLS))
def test_fullgraph_compile_with_a_scaled_backward_equals_eager(name):
    """torch.compile(fullgraph=True) traces the loss and its backward on CPU (the stored gradient is scaled by the
    upstream gradient, here 2.5, without branching on its value inside the traced graph); gradients equal eager's."""
    g = torch.Generator().manual_seed(0)
    x0, w0 = torch.randn(9, 7, generator=g), torch.randn(11, 7, generator=g)
    y = torch.randint(0, 11, (9,), generator=g)
    call = LOSS_CALLS[name]

    def fn(x, w):
        logits = x if name == "linear_cross_entropy" else x @ w.T
        return 2.5 * call(logits, y, w)

    grads = []
    for f in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        f(x, w).backward()
        grads.append((x.grad, w.grad))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-7)

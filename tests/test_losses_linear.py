"""Loss options (SPEC 4.5: softcap, label smoothing, class weights) of the fused row losses, and
linear_cross_entropy (SPEC 4.6) against F.linear + the reference loss, per backend and dtype; its memory bound,
bad input."""
import weakref

import pytest
import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import stabkernels as sk
from stabkernels.losses import default_chunk_size, stablemax_s

from .helpers import FLOAT_DTYPES, backend_params

CE_BACKENDS = backend_params("cross_entropy_z_loss")
SM_BACKENDS = backend_params("stablemax_cross_entropy")
N, H, V = 37, 12, 45  # odd: N is no multiple of the chunks used below, V no multiple of a vector
OPTIONS = {
    "plain": {},
    "z_coef": {"z_coef": 1e-2},
    "label_smoothing": {"label_smoothing": 0.3},
    "softcap": {"softcap": 2.5},
    "class_weight": {"class_weight": True},
    "ignore_index": {"ignore_index": 7},
    "all": {"z_coef": 1e-2, "label_smoothing": 0.2, "softcap": 4.0, "class_weight": True},
}


def rel_err(got, want):
    """Largest absolute error relative to the reference's largest magnitude (so near-zero entries do not blow up)."""
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-300)).item()


# float64 / float32 against a float64 reference; the half types round the logits chunk, its gradient and the
# GEMMs' inputs and outputs to 8 (bf16) / 11 (fp16) bits, so their errors are those roundings'
TOL = {torch.float64: 1e-7, torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}


def weights(v, seed=1):
    return torch.rand(v, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5


def reference(z, y, loss="softmax", z_coef=0.0, label_smoothing=0.0, softcap=None, class_weight=None,
              ignore_index=-100, reduction="mean"):
    """The torch composition linear_cross_entropy replaces (autograd-differentiable): F.cross_entropy for
    softmax (its weight= and label_smoothing=), the same formula with StableMax's probabilities for stablemax;
    the z-loss weighted by w_y and divided like the loss (SPEC 4.5)."""
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    valid = y != ignore_index
    yy = torch.where(valid, y, torch.zeros_like(y))
    w = torch.ones(z.shape[1], dtype=z.dtype) if class_weight is None else class_weight.to(z.dtype)
    w_y = torch.where(valid, w[yy], torch.zeros_like(w[yy]))
    if loss == "softmax":
        rows = F.cross_entropy(z, y, weight=class_weight, label_smoothing=label_smoothing, reduction="none",
                               ignore_index=ignore_index)
        rows = rows + w_y * z_coef * torch.logsumexp(z, 1) ** 2
    else:
        nl = -torch.log(stablemax_s(z) / stablemax_s(z).sum(1, keepdim=True))
        rows = ((1 - label_smoothing) * w_y * nl.gather(1, yy[:, None])[:, 0]
                + label_smoothing / z.shape[1] * (nl * w).sum(1))
        rows = torch.where(valid, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / w_y.sum()


def kwargs_of(name, v, dtype=torch.float64):
    kw = dict(OPTIONS[name])
    if kw.get("class_weight"):
        kw["class_weight"] = weights(v)
    return kw


def targets(n, v, ignore_index=-100, seed=0):
    y = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(seed))
    y[1] = ignore_index
    y[5] = ignore_index
    return y


# --------------------------------------------------------------------------------------------------
# the row ops' options


def test_reference_matches_f_cross_entropy_with_weights_and_smoothing():
    """The test's own reference is F.cross_entropy's formula (weighted mean with label smoothing included)."""
    z = torch.randn(N, V, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y, w = targets(N, V), weights(V)
    for red in ("mean", "sum", "none"):
        torch.testing.assert_close(reference(z, y, label_smoothing=0.3, class_weight=w, reduction=red),
                                   F.cross_entropy(z, y, weight=w, label_smoothing=0.3, reduction=red))


@pytest.mark.parametrize("backend,device", CE_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("option", ["label_smoothing", "softcap", "class_weight", "all"])
@pytest.mark.parametrize("loss", ["softmax", "stablemax"])
def test_row_ops_options(backend, device, dtype, option, loss):
    kw = kwargs_of(option, V)
    if loss == "stablemax":
        kw.pop("z_coef", None)
    z = (torch.randn(N, V, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 3).to(dtype)
    y = targets(N, V)
    for red in ("mean", "none"):
        x = z.to(device).clone().requires_grad_()
        dev_kw = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kw.items()}
        if loss == "softmax":
            got, _ = sk.cross_entropy_z_loss(x, y.to(device), dev_kw.pop("z_coef", 0.0), red, backend=backend, **dev_kw)
        else:
            got = sk.stablemax_cross_entropy(x, y.to(device), red, backend=backend, **dev_kw)
        (got.sum() if red == "none" else got).backward()
        r = z.double().clone().requires_grad_()
        want = reference(r, y, loss, reduction=red, **kw)
        (want.sum() if red == "none" else want).backward()
        tol = 1e-10 if dtype == torch.float64 else TOL[dtype]
        assert rel_err(got.cpu(), want) < tol
        assert rel_err(x.grad.cpu(), r.grad) < tol


@pytest.mark.skipif(sk.backend.why_unavailable("cpp", "cpu") is not None, reason="the cpp backend is not built")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("option", ["plain", "ignore_index", "all"])
@pytest.mark.parametrize("loss", ["softmax", "stablemax"])
@pytest.mark.parametrize("n", [3, 16, 37])
def test_cpp_row_ops_read_rows_stored_as_columns(dtype, option, loss, n):
    """The C++ row kernels take (N, V) logits whose rows are columns (a (V, N) matrix seen transposed: the logits
    chunks of linear_cross_entropy on CPU) as they lie, vectorised across rows, and write the gradient in the
    same layout, here over the logits themselves: loss rows and gradient equal the float64 reference. N = 3, 16,
    37: a partial strip of rows, whole ones, and both."""
    kw = kwargs_of(option, V)
    if loss == "stablemax":
        kw.pop("z_coef", None)
    ignore_index = kw.pop("ignore_index", -100)
    z = (torch.randn(n, V, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 3).to(dtype)
    y = targets(n, V, ignore_index) if n > 5 else torch.tensor([ignore_index, 0, V - 1])[:n]
    A = torch.float64 if dtype == torch.float64 else torch.float32
    x = z.t().contiguous().t()  # strides (1, n)
    cw = kw["class_weight"].to(A) if "class_weight" in kw else None
    scale = torch.tensor(1.0, dtype=A)
    args = (ignore_index, cw, kw.get("label_smoothing", 0.0), kw.get("softcap", 0.0))
    if loss == "softmax":
        ce, zl = torch.ops.stabkernels_C.cross_entropy_z_loss(x, y, x, scale, kw.get("z_coef", 0.0), *args)
        rows = ce + zl
    else:
        rows = torch.ops.stabkernels_C.stablemax_cross_entropy(x, y, x, scale, *args)
    r = z.double().requires_grad_()
    want = reference(r, y, loss, reduction="none", ignore_index=ignore_index, **kw)
    want.sum().backward()
    tol = 1e-10 if dtype == torch.float64 else TOL[dtype]
    assert x.stride() == (1, n)
    assert rel_err(rows, want) < tol
    assert rel_err(x, r.grad) < tol
    # a leading dimension past N, the gradient into its own buffer (columns too), and no gradient at all
    wide = torch.zeros(V, n + 3, dtype=dtype)
    wide[:, :n] = z.t()
    x = wide[:, :n].t()
    grad = torch.full((V, n), float("nan"), dtype=dtype).t()
    for g in (grad, x.new_empty(0)):
        if loss == "softmax":
            ce, zl = torch.ops.stabkernels_C.cross_entropy_z_loss(x, y, g, scale, kw.get("z_coef", 0.0), *args)
            rows = ce + zl
        else:
            rows = torch.ops.stabkernels_C.stablemax_cross_entropy(x, y, g, scale, *args)
        assert rel_err(rows, want) < tol
    assert rel_err(grad, r.grad) < tol
    assert torch.equal(wide[:, :n], z.t()) and not wide[:, n:].any()  # the logits and the padding untouched
    bad = y.clone()
    bad[-1] = V
    with pytest.raises(RuntimeError, match=rf"target {V} out of range \[0, {V}\)"):
        torch.ops.stabkernels_C.stablemax_cross_entropy(x, bad, grad, scale, *args)


@pytest.mark.skipif(sk.backend.why_unavailable("cpp", "cpu") is not None, reason="the cpp backend is not built")
@pytest.mark.parametrize("layout", ["rows", "columns"])
def test_cpp_row_ops_keep_a_nan_in_its_row(layout):
    """A NaN logit makes its own row's loss and gradient NaN and no other row's, in either layout."""
    z = torch.randn(37, V, dtype=torch.float32, generator=torch.Generator().manual_seed(5))
    z[20, 3] = float("nan")
    x = (z.t().contiguous().t() if layout == "columns" else z).requires_grad_()
    loss, _ = sk.cross_entropy_z_loss(x, targets(37, V), 1e-3, "none", backend="cpp")
    loss.sum().backward()
    bad = torch.zeros(37, dtype=torch.bool)
    bad[20] = True
    assert loss[bad].isnan().all() and loss[~bad].isfinite().all()
    assert x.grad[bad].isnan().all() and x.grad[~bad].isfinite().all()


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_opcheck_with_options(backend):
    if sk.backend.why_unavailable(backend, "cpu"):
        pytest.skip(sk.backend.why_unavailable(backend, "cpu"))
    z = torch.randn(6, 11)
    y = torch.tensor([0, 3, -100, 10, 4, 4])
    w, scale = torch.rand(11) + 0.5, torch.tensor(0.5)
    torch.library.opcheck(torch.ops.stabkernels.cross_entropy_z_loss.default,
                          (z, y, torch.empty_like(z), scale, 1e-3, -100, w, 0.1, 3.0, backend))
    torch.library.opcheck(torch.ops.stabkernels.stablemax_cross_entropy.default,
                          (z, y, torch.empty_like(z), scale, -100, w, 0.1, 3.0, backend))


# --------------------------------------------------------------------------------------------------
# linear_cross_entropy


def linear_data(dtype, device, seed=0, n=N, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, 2 * H, generator=g, dtype=torch.float64)[:, ::2]  # non-contiguous
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.7
    b = torch.randn(V, generator=g, dtype=torch.float64)
    cast = lambda t: t.to(dtype).to(device)  # noqa: E731
    return cast(h), cast(w), cast(b), targets(n, V, ignore_index).to(device)


def run_linear(h, w, b, y, **kw):
    """(loss, z_loss, grad hidden, grad weight, grad bias) of sk.linear_cross_entropy."""
    hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
    bb = None if b is None else b.clone().requires_grad_()
    loss, z = sk.linear_cross_entropy(hh, ww, y, bb, **kw)
    (loss.sum() if kw.get("reduction") == "none" else loss).backward()
    return loss, z, hh.grad, ww.grad, None if bb is None else bb.grad


def run_reference(h, w, b, y, **kw):
    hh, ww = h.double().requires_grad_(), w.double().requires_grad_()
    bb = None if b is None else b.double().requires_grad_()
    loss = reference(F.linear(hh, ww, bb), y.cpu(), **kw)
    (loss.sum() if kw.get("reduction") == "none" else loss).backward()
    return loss, hh.grad, ww.grad, None if bb is None else bb.grad


def check_linear(backend, device, dtype, option, loss="softmax", reduction="mean", bias=True, chunk_size=8):
    kw = kwargs_of(option, V)
    h, w, b, y = linear_data(dtype, device, ignore_index=kw.get("ignore_index", -100))
    b = b if bias else None
    got = run_linear(h, w, b, y, loss=loss, reduction=reduction, chunk_size=chunk_size, backend=backend,
                     **{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kw.items()})
    want = run_reference(h.cpu(), w.cpu(), None if b is None else b.cpu(), y, loss=loss, reduction=reduction, **kw)
    tol = TOL[dtype]
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got[2].dtype == dtype and got[2].shape == h.shape and got[3].dtype == dtype
    for name, g_, w_ in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), got[:1] + got[2:], want):
        if w_ is not None:
            assert rel_err(g_.cpu(), w_) < tol, (name, rel_err(g_.cpu(), w_))
    if "z_coef" in kw and reduction != "none":  # the z-loss part alone, detached
        assert not got[1].requires_grad and got[1] > 0
        zz = F.linear(h.double().cpu(), w.double().cpu(), b.double().cpu() if bias else None)
        if kw.get("softcap"):
            zz = kw["softcap"] * torch.tanh(zz / kw["softcap"])
        valid = y.cpu() != -100
        wy = kw["class_weight"][torch.where(valid, y.cpu(), 0)] if "class_weight" in kw else torch.ones(len(y))
        zrows = torch.where(valid, wy * kw["z_coef"] * torch.logsumexp(zz, 1) ** 2, 0)
        want_z = zrows.sum() / torch.where(valid, wy, 0).sum() if reduction == "mean" else zrows.sum()
        assert rel_err(got[1].cpu(), want_z) < tol
    elif reduction != "none":
        assert got[1].item() == 0


@pytest.mark.parametrize("backend,device", CE_BACKENDS)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_options_float64(backend, device, option, reduction):
    check_linear(backend, device, torch.float64, option, reduction=reduction)


@pytest.mark.parametrize("backend,device", CE_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("option", ["plain", "all"])
def test_linear_dtypes(backend, device, dtype, option):
    check_linear(backend, device, dtype, option, bias=option == "all")


@pytest.mark.parametrize("backend,device", SM_BACKENDS)
@pytest.mark.parametrize("option", ["plain", "label_smoothing", "softcap", "class_weight", "ignore_index"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_linear_stablemax(backend, device, option, dtype):
    check_linear(backend, device, dtype, option, loss="stablemax", reduction="sum" if option == "plain" else "mean")


def test_default_chunk_sizes():
    """Liger's rule (about N / ceil(V / H) rows, a power of two), at least 128 rows or N / 8; on CPU at least N / 8
    (the 1/8 memory budget) up to 512 rows, never past Liger's where that is larger."""
    from stabkernels.losses import MAX_CPU_CHUNK_ROWS
    assert default_chunk_size(1024, 512, 16384) == default_chunk_size(1024, 512, 16384, cpu=True) == 128
    assert default_chunk_size(2048, 1024, 32768) == 128 and default_chunk_size(2048, 1024, 32768, cpu=True) == 256
    assert default_chunk_size(8192, 4096, 32768) == default_chunk_size(8192, 4096, 32768, cpu=True) == 1024
    assert default_chunk_size(65536, 4096, 131072, cpu=True) == 2048  # Liger's
    assert default_chunk_size(65536, 512, 131072, cpu=True) == MAX_CPU_CHUNK_ROWS == 512  # not 8192 rows
    assert default_chunk_size(40, 8, 1000) == default_chunk_size(40, 8, 1000, cpu=True) == 4  # N / 8


@pytest.mark.parametrize("chunk_size", [1, 5, 37, 64, None])
def test_linear_chunk_sizes_and_leading_dimensions(chunk_size):
    h, w, b, y = linear_data(torch.float64, "cpu")
    got = run_linear(h[:36].reshape(4, 9, H), w, b, y[:36].reshape(4, 9), chunk_size=chunk_size)
    want = run_reference(h[:36], w, b, y[:36])
    assert rel_err(got[0], want[0]) < 1e-12 and got[2].shape == (4, 9, H)
    for g_, w_ in zip(got[2:], want[1:]):
        assert rel_err(g_.reshape(w_.shape), w_) < 1e-12


def test_linear_second_backward_and_upstream_gradient():
    h, w, b, y = linear_data(torch.float64, "cpu")
    hh = h.clone().requires_grad_()
    loss, _ = sk.linear_cross_entropy(hh, w, y, b, z_coef=1e-3)
    loss.backward(torch.tensor(2.5), retain_graph=True)
    first = hh.grad.clone()
    loss.backward(torch.tensor(2.5))  # recomputed by the chunked pass
    torch.testing.assert_close(hh.grad, 2 * first)
    r = h.clone().requires_grad_()
    (reference(F.linear(r, w, b), y, z_coef=1e-3) * 2.5).backward()
    torch.testing.assert_close(first, r.grad)
    torch.autograd.gradcheck(lambda t, u: sk.linear_cross_entropy(t, u, y[:6], reduction="none", softcap=2.0,
                                                                  label_smoothing=0.1, chunk_size=4)[0],
                             (h[:6].clone().requires_grad_(), w.clone().requires_grad_()))


def test_linear_without_gradients_and_only_some():
    h, w, b, y = linear_data(torch.float64, "cpu")
    loss, _ = sk.linear_cross_entropy(h, w, y, b)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, reference(F.linear(h, w, b), y))
    ww = w.clone().requires_grad_()
    sk.linear_cross_entropy(h, ww, y, b)[0].backward()  # weight only (a frozen trunk)
    rw = w.clone().requires_grad_()
    reference(F.linear(h, rw, b), y).backward()
    torch.testing.assert_close(ww.grad, rw.grad)


class _LargestBuffer(TorchDispatchMode):
    """The largest tensor any op outputs (in elements) while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("v", [4096, 16384])
def test_linear_never_holds_the_logits(v):
    """At the benchmark's shape (1024 tokens x 512 hidden), the largest buffer of the forward and backward is the
    (chunk, V) logits chunk: at most 1/8 of the (N, V) logits (the outputs grad_weight (V, H) and grad_hidden
    (N, H) aside: F.linear's backward makes them too)."""
    n, hdim = 1024, 512
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, hdim, generator=g).requires_grad_()
    w = (torch.randn(v, hdim, generator=g) * 0.02).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    chunk = default_chunk_size(n, hdim, v, cpu=True)
    assert chunk * v <= n * v // 8
    with _LargestBuffer() as mode:
        loss, _ = sk.linear_cross_entropy(h, w, y, backend="cpp" if sk.backend.why_unavailable("cpp", "cpu") is None
                                          else "torch")
        loss.backward()
    assert mode.largest <= max(chunk * v, v * hdim), (mode.largest, chunk * v, n * v)
    with _LargestBuffer() as eager:
        F.cross_entropy(h @ w.T, y).backward()
    assert eager.largest == n * v  # the measure sees the logits where they exist


class _LiveBytes(TorchDispatchMode):
    """The bytes of the storages that ops allocate while active and that are still alive, and their peak: a storage
    counts from the op that first outputs it (not a view of an input, not an out= or in-place result) until the
    last tensor on it that an op returned is freed."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._tensors = {}  # storage data_ptr -> ids of the live tensors on it

    def _freed(self, key, ident, nbytes):
        ids = self._tensors[key]
        ids.discard(ident)
        if not ids:
            del self._tensors[key]
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.untyped_storage().nbytes() == 0:
                continue
            key, nbytes = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
            if key not in self._tensors:
                if key in inputs:
                    continue  # a view of, or a write into, memory allocated before
                self._tensors[key] = set()
                self.live += nbytes
                self.peak = max(self.peak, self.live)
            if id(t) not in self._tensors[key]:
                self._tensors[key].add(id(t))
                weakref.finalize(t, self._freed, key, id(t), nbytes)
        return out


def test_linear_holds_one_logits_chunk_at_a_time():
    """Peak live memory of forward + backward at the benchmark's shape (1024 tokens x 512 hidden x 16384): the
    gradients of hidden and weight (which F.linear's backward makes too) plus one (chunk, V) buffer, 1/8 of the
    (N, V) logits, and small per-row vectors; not two chunks (the next chunk's logits allocated while the last
    one's were still referenced), and not the logits (checked: F.linear + F.cross_entropy's peak holds them)."""
    n, hdim, v = 1024, 512, 16384
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, hdim, generator=g).requires_grad_()
    w = (torch.randn(v, hdim, generator=g) * 0.02).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    chunk = default_chunk_size(n, hdim, v, cpu=True)
    grads, buffer = (n * hdim + v * hdim) * 4, chunk * v * 4
    with _LiveBytes() as mode:
        loss, _ = sk.linear_cross_entropy(h, w, y, backend="cpp" if sk.backend.why_unavailable("cpp", "cpu") is None
                                          else "torch")
        loss.backward()
    assert buffer <= n * v * 4 // 8
    assert mode.peak - grads <= buffer + 64 * n * 4, (mode.peak - grads, buffer)
    h.grad = w.grad = None
    with _LiveBytes() as eager:
        F.cross_entropy(h @ w.T, y).backward()
    assert eager.peak - grads >= n * v * 4  # the measure sees the logits where they exist


def test_bad_input_names_the_argument():
    h, w, b, y = linear_data(torch.float32, "cpu")
    h = h.contiguous()
    cases = [
        (dict(weight=w[:, :5]), ValueError, "weight must be"),
        (dict(target=y[:4]), ValueError, "target must have shape"),
        (dict(target=y.int()), TypeError, "int64"),
        (dict(class_weight=torch.ones(V - 1)), ValueError, "class_weight must have shape"),
        (dict(softcap=0.0), ValueError, "softcap"),
        (dict(softcap=-1.0), ValueError, "softcap"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
        (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
        (dict(loss="sparsemax"), ValueError, "loss must be one of"),
        (dict(loss="stablemax", z_coef=1e-4), ValueError, "z_coef"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(bias=torch.zeros(V + 1)), ValueError, "bias must be"),
        (dict(weight=w.double()), ValueError, "must match hidden"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(hidden=h[0]), ValueError, r"hidden must be \(N, H\)"),
    ]
    for change, err, match in cases:
        args = dict(hidden=h, weight=w, target=y, bias=b)
        args.update(change)
        with pytest.raises(err, match=match):
            sk.linear_cross_entropy(**args)
    with pytest.raises(ValueError, match="label_smoothing"):
        sk.cross_entropy_z_loss(h @ w.T, y, label_smoothing=2.0)
    with pytest.raises(ValueError, match="class_weight must have shape"):
        sk.stablemax_cross_entropy(h @ w.T, y, class_weight=torch.ones(3))

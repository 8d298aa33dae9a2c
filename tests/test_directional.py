"""Directional family: the stream is the same on every backend and block size, perturb never touches the
parameters, directional_dots equals explicit dots, orthograd_ projects and rescales."""
import math

import pytest
import torch

import stabkernels as sk
from stabkernels import directional as D

from .helpers import FLOAT_DTYPES, backend_params

DIR_BACKENDS = backend_params("random_directions")
PERTURB_BACKENDS = backend_params("perturb")
DOTS_BACKENDS = backend_params("directional_dots")
ORTHO_BACKENDS = backend_params("orthograd_")

SHAPES = [(37,), (5, 9), (3, 4, 5), (1,), (2, 1000), (3, 701)]  # 2103: a partial block then a tail


def tensors(device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) for s in SHAPES]


def test_stream_reference_matches_an_independent_philox():
    """The reference Philox (int64 arithmetic) against a plain Python-int Philox4x32-10 and Triton's counter
    convention: key halves, counter (lo, hi, 0, 0)."""
    def philox_py(key, ctr):
        k0, k1 = key & 0xFFFFFFFF, key >> 32
        c = [ctr & 0xFFFFFFFF, ctr >> 32, 0, 0]
        for _ in range(10):
            pa, pb = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
            c = [(pb >> 32) ^ c[1] ^ k0, pb & 0xFFFFFFFF, (pa >> 32) ^ c[3] ^ k1, pa & 0xFFFFFFFF]
            k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
        return c
    key = D.stream_key(7, 3, 2)
    ctrs = torch.tensor([0, 1, 2 ** 32 + 5, 123456789], dtype=torch.int64)
    words = torch.stack(D.philox4x32_10(key, ctrs), dim=1).tolist()
    assert words == [philox_py(key, c) for c in ctrs.tolist()]
    # Random123's published known-answer test for Philox4x32-10 (counter 0, key 0)
    assert [int(w) for w in torch.stack(D.philox4x32_10(0, torch.tensor([0])), 1)[0]] == \
        [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_stream_normals_are_box_muller_to_float32_accuracy():
    """The float32 Box-Muller of step 3 against float64 Box-Muller with libm's log/cos/sin on the same uniforms
    (radius u = (2 (wa >> 9) + 1) 2^-24, angle 2 pi (octant + fraction) / 8), and its moments."""
    w = D.philox4x32_10(D.stream_key(3, 1, 4), torch.arange(250_000))
    for wa, wb in ((w[0], w[1]), (w[2], w[3])):
        a, b = D.box_muller(wa, wb)
        assert a.dtype == b.dtype == torch.float32
        u = (2 * (wa >> 9) + 1).double() * 2.0 ** -24
        k = (wb >> 6) & 0x7FFFFF
        angle = 2 * math.pi * ((wb >> 29).double() + (2 * k + 1).double() * 2.0 ** -24) / 8
        r = torch.sqrt(-2 * torch.log(u))
        torch.testing.assert_close(a.double(), r * torch.cos(angle), rtol=4e-7, atol=4e-7)
        torch.testing.assert_close(b.double(), r * torch.sin(angle), rtol=4e-7, atol=4e-7)
    n = torch.cat([a, b]).double()
    assert abs(n.mean().item()) < 0.01 and abs(n.std().item() - 1) < 0.01
    assert abs(((n - n.mean()) ** 4).mean().item() / n.var().item() ** 2 - 3) < 0.05  # Gaussian kurtosis


def test_reference_sqrt_is_correctly_rounded():
    numpy = pytest.importorskip("numpy")
    x = torch.rand(100_000, dtype=torch.float64).mul(40).float() + 1e-30
    assert torch.equal(D.sqrt_rn(x), torch.from_numpy(numpy.sqrt(x.numpy())))  # numpy's is IEEE


@pytest.mark.parametrize("backend,device", DIR_BACKENDS)
def test_random_directions_equal_the_reference_bit_for_bit(backend, device):
    like = tensors(device) + [torch.empty(3, 7, device=device, dtype=torch.float64),
                              torch.empty(11, device=device, dtype=torch.bfloat16)]
    want = D.random_directions(like, 1234, 5, backend="torch")
    got = D.random_directions(like, 1234, 5, backend=backend)
    for w, g, t in zip(want, got, like):
        assert g.shape == t.shape and g.dtype == (torch.float64 if t.dtype == torch.float64 else torch.float32)
        if device == "cuda":
            torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
        else:
            assert torch.equal(g, w)


def test_directions_are_unit_norm_zero_mean_and_independent_of_probe_seed_and_index():
    big = [torch.empty(200_000), torch.empty(300, 301)]
    d = D.random_directions(big, 1, 0)
    for x in d:
        assert x.double().norm().item() == pytest.approx(1.0, abs=1e-6)
        n = x.double() * math.sqrt(x.numel())  # back to unit-variance normals
        assert abs(n.mean().item()) < 5 / math.sqrt(x.numel()) and abs(n.std().item() - 1) < 0.01
    other_probe = D.random_directions(big, 1, 1)[0]
    other_seed = D.random_directions(big, 2, 0)[0]
    for other in (other_probe, other_seed):
        assert abs((d[0] * other).sum().item()) < 0.02  # nearly orthogonal: independent streams
    m = d[1].numel()  # another tensor index: another stream too
    assert abs((d[0][:m] * d[1].flatten()).sum().item()) / d[0][:m].norm().item() < 0.02


def test_cpu_directions_do_not_depend_on_thread_count_or_triton_block():
    like = [torch.empty(20_003), torch.empty(17, 9)]  # 313 blocks of 64 under the Triton interpreter
    want = D.random_directions(like, 9, 4, backend="torch")
    if sk.backend.why_unavailable("cpp", "cpu") is None:
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = D.random_directions(like, 9, 4, backend="cpp")
        finally:
            torch.set_num_threads(threads)
        assert all(torch.equal(a, b) for a, b in zip(one, want))
    if sk.backend.why_unavailable("triton", "cpu") is None:
        from stabkernels.triton import directional as tk
        old = tk.BLOCK
        try:
            tk.BLOCK = 64
            small = D.random_directions(like, 9, 4, backend="triton")
        finally:
            tk.BLOCK = old
        assert all(torch.equal(a, b) for a, b in zip(small, want))


@pytest.mark.parametrize("backend,device", PERTURB_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_perturb_leaves_params_and_equals_theta_plus_sigma_d(backend, device, dtype):
    params = tensors(device, dtype)
    saved = [p.clone() for p in params]
    out = D.perturb(params, 77, 3, 0.01, backend=backend)
    assert all(torch.equal(p, s) for p, s in zip(params, saved))
    d = D.random_directions(params, 77, 3, backend="torch")
    for p, o, dd in zip(params, out, d):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        want = (p.to(acc) + torch.tensor(0.01, dtype=acc) * dd.to(p.device)).to(dtype)
        if dtype in (torch.float32, torch.float64) and device == "cpu":
            assert torch.equal(o, want)
        else:  # fp16/bf16: the Triton interpreter truncates stores, a GPU rounds: one storage ulp at most
            torch.testing.assert_close(o.to(acc), want.to(acc), rtol=2 ** -7, atol=1e-6)
    again = D.perturb(params, 77, 3, 0.01, out=out, backend=backend)  # scratch reuse
    assert again is out or all(a is b for a, b in zip(again, out))


def test_perturb_errors():
    params = tensors()
    with pytest.raises(ValueError, match="aliases"):
        D.perturb(params, 1, 0, 0.1, out=params)
    with pytest.raises(ValueError, match=r"out\[1\] must be a contiguous torch.float32"):
        D.perturb(params, 1, 0, 0.1, out=[torch.empty_like(params[0]), torch.empty(3)] + params[2:])
    with pytest.raises(ValueError, match="finite"):
        D.perturb(params, 1, 0, float("nan"))
    with pytest.raises(TypeError, match="list of tensors"):
        D.perturb(params[0], 1, 0, 0.1)
    with pytest.raises(TypeError, match="seed"):
        D.perturb(params, 1.5, 0, 0.1)


@pytest.mark.parametrize("backend,device", DOTS_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "transposed"])
def test_directional_dots_equal_explicit_dots(backend, device, dtype, contiguous):
    grads = tensors(device, dtype, seed=3)
    if not contiguous:  # the stream follows the logical (row-major) order, whatever the strides
        grads = [g.t().contiguous().t() if g.dim() == 2 else g for g in grads]
        assert not grads[1].is_contiguous()
    got = D.directional_dots(grads, 5, 4, first_probe=10, backend=backend)
    assert got.shape == (4,)
    for k in range(4):
        d = D.random_directions(grads, 5, 10 + k, backend="torch")
        want = sum((g.double() * dd.to(g.device).double()).sum() for g, dd in zip(grads, d))
        assert got[k].item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("backend,device", ORTHO_BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_orthograd_projects_and_keeps_the_norm(backend, device, dtype):
    params = [torch.nn.Parameter(t) for t in tensors(device, dtype)]
    grads = tensors(device, dtype, seed=1)
    grads[3] = torch.zeros_like(grads[3])  # a zero gradient
    with torch.no_grad():
        params[2].zero_()  # a zero weight
    for p, g in zip(params, grads):
        p.grad = g.clone()
    sk.orthograd_(params, backend=backend)
    ref = [g.clone() for g in grads]
    D.orthograd_reference([p.detach() for p in params], ref)
    tol = 1e-12 if dtype == torch.float64 else 1e-5 if dtype == torch.float32 else 2e-2
    for p, g, r in zip(params, grads, ref):
        new = p.grad.double()
        assert torch.isfinite(new).all()
        torch.testing.assert_close(new, r.double(), rtol=tol, atol=tol)
        if g.abs().sum() > 0 and p.detach().abs().sum() > 0:
            assert abs((new * p.detach().double()).sum().item()) <= tol * 10 * new.norm() * p.detach().double().norm()
            assert new.norm().item() == pytest.approx(g.double().norm().item(), rel=max(tol, 1e-6) * 10)


def test_directions_dots_and_orthograd_errors():
    grads = tensors()
    with pytest.raises(TypeError, match="tensors must be a list of tensors"):
        D.random_directions(grads[0], 1, 0)
    with pytest.raises(ValueError, match="tensors is empty"):
        D.random_directions([], 1, 0)
    with pytest.raises(ValueError, match="num_probes must be >= 1"):
        D.directional_dots(grads, 1, 0)
    with pytest.raises(TypeError, match=r"grads\[1\] must be float32.*integer"):
        D.directional_dots([grads[0], torch.ones(3, dtype=torch.int32)], 1, 2)
    ok, p = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(4, 5))
    ok.grad, p.grad = torch.randn(3), torch.randn(4, 5).to_sparse()  # as nn.Embedding(sparse=True) makes
    before = ok.grad.clone()
    with pytest.raises(ValueError, match=r"params\[1\].grad must be a dense torch.float32 tensor"):
        sk.orthograd_([ok, p])
    assert torch.equal(ok.grad, before)  # every check runs before anything is written
    q = torch.nn.Parameter(torch.randn(5, 4).t())
    q.grad = torch.randn(4, 5)
    with pytest.raises(ValueError, match=r"params\[0\] and its grad must be contiguous"):
        sk.orthograd_([q])


def test_orthograd_near_parallel_gradient_uses_an_accurate_norm():
    w = torch.randn(1000, dtype=torch.float64)
    g = 3.0 * w + 1e-4 * torch.randn(1000, dtype=torch.float64)
    p = torch.nn.Parameter(w.float())
    p.grad = g.float()
    sk.orthograd_([p])
    ref = [g.float().clone()]
    D.orthograd_reference([w.float()], ref)
    torch.testing.assert_close(p.grad, ref[0], rtol=1e-3, atol=1e-5)


SHARD_BACKENDS = backend_params("shard_normals")


@pytest.mark.parametrize("backend,device", SHARD_BACKENDS)
def test_shard_normals_are_the_slice_of_the_stream_bit_for_bit(backend, device):
    """A DTensor shard's stream: elements [offset, offset + n) of the tensor's stream, for offsets inside a
    Philox group of 4, empty shards and shards that span several generation blocks."""
    from stabkernels import directional as D

    cases = [(0, 5), (3, 1), (9, 4100), (2, 2), (5000, 0), (1, 3)]
    keys = [D.stream_key(7, 1, i) for i in range(len(cases))]
    out = [torch.full((n,), float("nan"), device=device) for _, n in cases]
    table = torch.tensor([D.signed64(k) for k in keys], dtype=torch.int64)
    sums = torch.ops.stabkernels.shard_normals(out, table, [off for off, _ in cases], backend)
    for (off, n), k, o, s in zip(cases, keys, out, sums.cpu()):
        want = D.stream_normals(k, off + n)[off:]
        assert torch.equal(o.cpu(), want), (off, n)
        torch.testing.assert_close(s, want.double().square().sum(), rtol=1e-12, atol=0)


def test_shard_normals_errors():
    from stabkernels import directional as D

    keys = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.stabkernels.shard_normals([torch.empty(3, dtype=torch.float64), torch.empty(2)], keys, [0, 0], "cpp")
    with pytest.raises(RuntimeError, match="one key and one offset"):
        torch.ops.stabkernels.shard_normals([torch.empty(3), torch.empty(2)], keys, [0], "cpp")

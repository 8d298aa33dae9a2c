"""Spectral family ops: power iteration, sums of squares, stable rank, top singular triplets, smoothing."""
import pytest
import torch

import stabkernels as sk
from stabkernels.spectral import (as_matrix, power_iteration_reference, smooth_values, sq_norms_reference)

from .helpers import backend_params

PI_BACKENDS = backend_params("power_iteration_")
SQ_BACKENDS = backend_params("sq_norms")


def matrix_with_spectrum(s, m, n, dtype=torch.float64, seed=0):
    """An m x n matrix with singular values s (descending) and random singular vectors."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64)).Q
    return (U * torch.tensor(s, dtype=torch.float64)) @ V.T


def mixed_mats(device):
    """Odd shapes, every float dtype, a conv weight, non-contiguous, 1 x n and n x 1."""
    return [
        torch.randn(37, 50, device=device),
        torch.randn(8, 3, 3, 3, device=device, dtype=torch.float64),
        torch.randn(20, 9, device=device).to(torch.bfloat16),
        torch.randn(13, 11, device=device).to(torch.float16),
        torch.randn(30, 12, device=device).t(),  # column-major
        torch.randn(1, 17, device=device),
        torch.randn(23, 1, device=device),
    ]


def clone_all(ts):
    return [t.clone() for t in ts]


@pytest.mark.parametrize("backend,device", PI_BACKENDS)
def test_power_iteration_matches_float64_reference(backend, device):
    mats = mixed_mats(device)
    us, vs = sk.init_power_vectors(mats, torch.Generator().manual_seed(1))
    u64, v64 = [u.double().clone() for u in us], [v.double().clone() for v in vs]  # .double() of fp64 aliases
    got = sk.power_iteration_(mats, us, vs, 3, backend=backend)
    want = power_iteration_reference([as_matrix(w).double() for w in mats], u64, v64, 3, 1e-12)
    assert got.dtype == torch.float64  # one float64 matrix in the list
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(us + vs, u64 + v64):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend,device", PI_BACKENDS)
@pytest.mark.parametrize("kind", ["gapped", "low_rank", "random"])
def test_sigma_matches_svdvals_after_warmup(backend, device, kind):
    if kind == "gapped":
        mats = [matrix_with_spectrum([9.0, 4.5, 3, 2, 1], 40, 64, seed=s).float() for s in range(3)]
        iters = 15
    elif kind == "low_rank":
        mats = [matrix_with_spectrum([5.0, 1.0], 33, 17, seed=s).float() for s in range(3)]
        iters = 15
    else:  # random Gaussian: small gaps, so more iterations
        mats = [torch.randn(29, 41), torch.randn(64, 16), torch.randn(16, 64)]
        iters = 300
    mats = [m.to(device) for m in mats]
    us, vs = sk.init_power_vectors(mats, torch.Generator().manual_seed(2))
    got = sk.power_iteration_(mats, us, vs, iters, backend=backend)
    want = torch.stack([torch.linalg.svdvals(m.double())[0] for m in mats]).float()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)


@pytest.mark.parametrize("backend,device", PI_BACKENDS)
def test_grouped_equals_per_matrix(backend, device):
    mats = mixed_mats(device)
    us, vs = sk.init_power_vectors(mats, torch.Generator().manual_seed(3))
    us1, vs1 = clone_all(us), clone_all(vs)
    grouped = sk.power_iteration_(mats, us, vs, 2, backend=backend)
    single = torch.cat([sk.power_iteration_([w], [u], [v], 2, backend=backend).double()
                        for w, u, v in zip(mats, us1, vs1)])
    torch.testing.assert_close(grouped.double(), single, rtol=1e-6, atol=1e-6)
    for a, b in zip(us + vs, us1 + vs1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", PI_BACKENDS)
def test_zero_matrix_gives_zero_and_keeps_vectors(backend, device):
    mats = [torch.zeros(6, 9, device=device), torch.randn(5, 4, device=device)]
    us, vs = sk.init_power_vectors(mats, torch.Generator().manual_seed(4))
    before = clone_all(us[:1] + vs[:1])
    sig = sk.power_iteration_(mats, us, vs, 5, backend=backend)
    assert sig[0].item() == 0.0 and sig[1].item() > 0
    assert torch.equal(us[0], before[0]) and torch.equal(vs[0], before[1])


@pytest.mark.parametrize("backend,device", PI_BACKENDS)
def test_non_finite_matrix_raises_naming_it_and_keeps_vectors(backend, device):
    bad = torch.randn(7, 5, device=device)
    bad[3, 2] = float("nan")
    mats = [torch.randn(4, 4, device=device), bad]
    us, vs = sk.init_power_vectors(mats, torch.Generator().manual_seed(5))
    before = clone_all(us + vs)
    with pytest.raises(ValueError, match=r"mats\[1\] \(shape \(7, 5\)\) holds non-finite"):
        sk.power_iteration_(mats, us, vs, 2, backend=backend)
    assert torch.equal(us[1], before[1]) and torch.equal(vs[1], before[3])
    assert torch.isfinite(us[0]).all()


def test_power_iteration_errors_name_the_problem():
    w = torch.randn(4, 6)
    u, v = sk.init_power_vectors([w])
    with pytest.raises(ValueError, match="same length"):
        sk.power_iteration_([w], u, v + v)
    with pytest.raises(ValueError, match=r"vs\[0\] must be a 1-D tensor of 6"):
        sk.power_iteration_([w], u, [torch.ones(5)])
    with pytest.raises(ValueError, match=r"us\[0\] must be a contiguous torch.float32"):
        sk.power_iteration_([w], [u[0].double()], v)
    with pytest.raises(ValueError, match="ndim >= 2"):
        sk.power_iteration_([torch.randn(5)], [torch.ones(5)], [torch.ones(1)])
    with pytest.raises(TypeError, match="list of tensors"):
        sk.power_iteration_(w, u, v)
    with pytest.raises(TypeError, match="integer"):
        sk.power_iteration_([torch.ones(3, 3, dtype=torch.int32)], u, v)
    assert sk.power_iteration_([], [], []).numel() == 0


@pytest.mark.parametrize("backend,device", SQ_BACKENDS)
def test_sq_norms_matches_float64_reference(backend, device):
    ts = mixed_mats(device) + [torch.randn(100_003, device=device), torch.zeros(3, device=device)]
    got = sk.sq_norms(ts, backend=backend)
    want = sq_norms_reference([t.double() for t in ts])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


def test_sq_norms_errors_name_the_problem():
    with pytest.raises(TypeError, match="tensors must be a list of tensors"):
        sk.sq_norms(torch.randn(3, 4))
    with pytest.raises(TypeError, match=r"tensors\[1\] must be float32.*integer"):
        sk.sq_norms([torch.randn(3), torch.ones(3, dtype=torch.int64)])
    with pytest.raises(ValueError, match=r"tensors must all be on one device, got \['cpu', 'meta'\]"):
        sk.sq_norms([torch.randn(3), torch.randn(3, device="meta")])
    assert sk.sq_norms([]).shape == (0,)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_opcheck(backend):
    if sk.backend.why_unavailable(backend, "cpu"):
        pytest.skip(sk.backend.why_unavailable(backend, "cpu"))
    mats = [torch.randn(7, 5), torch.randn(3, 9, dtype=torch.float64)]
    us, vs = sk.init_power_vectors(mats)
    torch.library.opcheck(torch.ops.stabkernels.power_iteration_.default, (mats, us, vs, 2, 1e-12, backend))
    torch.library.opcheck(torch.ops.stabkernels.sq_norms.default, (mats, backend))


def test_stable_rank():
    mats = [matrix_with_spectrum([4.0, 2.0, 2.0], 10, 12).float(), torch.zeros(3, 3),
            matrix_with_spectrum([3.0], 5, 7).float()]
    sr = sk.stable_rank(mats)
    torch.testing.assert_close(sr, torch.tensor([24 / 16, 0.0, 1.0]), rtol=1e-4, atol=1e-6)
    sig = torch.tensor([4.0, 0.0, 3.0])
    torch.testing.assert_close(sk.stable_rank(mats, sig), torch.tensor([1.5, 0.0, 1.0]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch", [False, True], ids=["per-matrix", "batched"])
def test_top_singular_matches_svd(batch):
    mats = [matrix_with_spectrum([10, 7, 5, 1, 0.5, 0.2], 40, 30, seed=s).float() for s in range(3)]
    mats.append(matrix_with_spectrum([6, 3, 1], 20, 50, seed=9))  # another shape, float64
    out = sk.top_singular(mats, [3, 2, 3, 2], generator=torch.Generator().manual_seed(0), batch=batch)
    for w, (U, S, V), k in zip(mats, out, [3, 2, 3, 2]):
        assert U.shape == (w.shape[0], k) and S.shape == (k,) and V.shape == (w.shape[1], k)
        assert U.dtype == (torch.float64 if w.dtype == torch.float64 else torch.float32)
        Ut, St, Vht = torch.linalg.svd(w.double())
        torch.testing.assert_close(S.double(), St[:k], rtol=1e-4, atol=0)
        # singular vectors up to sign
        torch.testing.assert_close((U.double().T @ Ut[:, :k]).abs().diagonal(), torch.ones(k, dtype=torch.float64),
                                   rtol=0, atol=1e-3)
        torch.testing.assert_close((V.double().T @ Vht[:k].T).abs().diagonal(), torch.ones(k, dtype=torch.float64),
                                   rtol=0, atol=1e-3)


def test_top_singular_warm_start_converges_without_power_steps():
    w = matrix_with_spectrum([10, 9, 8, 1, 0.9, 0.8, 0.7], 60, 50).float()
    _, _, Vt = torch.linalg.svd(w.double())
    cold = sk.top_singular([w], 3, oversample=0, iters=0, generator=torch.Generator().manual_seed(0))[0][1]
    warm = sk.top_singular([w], 3, oversample=0, iters=0, init=[Vt[:3].T.float()],
                           generator=torch.Generator().manual_seed(0))[0][1]
    exact = torch.tensor([10.0, 9.0, 8.0])
    assert (warm - exact).abs().max() < 1e-4 < (cold - exact).abs().max()


@pytest.mark.parametrize("rule", ["clip", "log", "mean", "cap"])
def test_smooth_values_rules(rule):
    s = torch.tensor([9.0, 6.0, 5.0, 4.5, 4.0], dtype=torch.float64)
    t = smooth_values(s, rule, cap=5.5, window=3)
    assert t[0] <= s[0]
    if rule == "mean":
        torch.testing.assert_close(t.sum(), s.sum())
        assert (t ** 2).sum() <= (s ** 2).sum()
    else:
        assert (t <= s).all()
    expected = {"clip": torch.full((5,), 4.0, dtype=torch.float64),
                "cap": torch.tensor([5.5, 5.5, 5.0, 4.5, 4.0], dtype=torch.float64),
                "log": 4.0 * (1 + torch.log(s / 4.0)),
                "mean": torch.tensor([(9 + 9 + 6) / 3, (9 + 6 + 5) / 3, (6 + 5 + 4.5) / 3, (5 + 4.5 + 4) / 3,
                                      (4.5 + 4 + 4) / 3], dtype=torch.float64)}[rule]
    torch.testing.assert_close(t, expected)


SMOOTH_SPECTRUM = [10.0, 9.0, 8.0, 7.0, 2.0, 1.5, 1.0, 0.5]  # SR = 3.02 -> k = 3


@pytest.mark.parametrize("backend,device", PI_BACKENDS)
@pytest.mark.parametrize("rule", ["clip", "log", "mean", "cap"])
def test_spectral_smooth_properties(backend, device, rule):
    w64 = matrix_with_spectrum(SMOOTH_SPECTRUM, 48, 36)
    w = w64.float().to(device)
    before = torch.linalg.svdvals(w.double())
    rep = sk.spectral_smooth_([w], rule=rule, cap=8.5, generator=torch.Generator().manual_seed(0),
                              backend=backend)
    after = torch.linalg.svdvals(w.double())
    k = int(rep.k[0])
    assert k == 3 and bool(rep.changed[0])
    target = {"clip": 8.0, "log": 8.0 * (1 + torch.log(torch.tensor(10 / 8.0))).item(),
              "mean": (10 + 10 + 9) / 3, "cap": 8.5}[rule]
    assert abs(after[0].item() - target) < 1e-3 * target
    assert abs(rep.sigma_after[0].item() - target) < 1e-3 * target
    torch.testing.assert_close(after[k:], before[k:], rtol=0, atol=1e-4)  # below the k-th: unchanged
    if rule != "mean":
        assert (after <= before + 1e-4).all()  # no singular value raised
    else:
        torch.testing.assert_close(after[:k].sum(), before[:k].sum(), rtol=1e-5, atol=0)
    assert torch.linalg.norm(w.double()) <= torch.linalg.norm(w64) + 1e-5


def test_spectral_smooth_special_matrices():
    rank1 = matrix_with_spectrum([3.0], 9, 7).float()
    zero = torch.zeros(5, 6)
    row = torch.randn(1, 17)
    conv = torch.randn(16, 3, 3, 3)
    half = matrix_with_spectrum(SMOOTH_SPECTRUM, 48, 36).to(torch.bfloat16)
    mats = [rank1, zero, row, conv, half]
    saved = clone_all(mats)
    rep = sk.spectral_smooth_(mats, generator=torch.Generator().manual_seed(0))
    assert torch.equal(rank1, saved[0]) and torch.equal(zero, saved[1]) and torch.equal(row, saved[2])
    assert rep.k.tolist()[:3] == [1, 1, 1] and rep.sigma_before[1].item() == 0.0
    assert torch.isfinite(rep.sigma_after).all()
    assert conv.shape == (16, 3, 3, 3) and bool(rep.changed[3])
    assert torch.linalg.svdvals(sk.spectral.as_matrix(conv))[0] <= torch.linalg.svdvals(as_matrix(saved[3]))[0]
    assert half.dtype == torch.bfloat16 and abs(torch.linalg.svdvals(half.double())[0].item() - 8.0) < 0.1
    # cap acts even at k = 1, straight from the power-iteration vectors
    capped = [row.clone(), rank1.clone()]
    sk.spectral_smooth_(capped, rule="cap", cap=1.0, generator=torch.Generator().manual_seed(0))
    for c in capped:
        assert abs(torch.linalg.svdvals(c.double())[0].item() - 1.0) < 1e-4


def test_spectral_smooth_non_contiguous_weight_is_updated_in_place():
    base = matrix_with_spectrum(SMOOTH_SPECTRUM, 36, 48).float()
    w = base.t()  # (48, 36) view with no row-contiguous layout
    sk.spectral_smooth_([w], generator=torch.Generator().manual_seed(0))
    assert abs(torch.linalg.svdvals(base.double())[0].item() - 8.0) < 1e-2


def test_spectral_smooth_errors():
    w = torch.randn(6, 6)
    with pytest.raises(ValueError, match="rule"):
        sk.spectral_smooth_([w], rule="median")
    with pytest.raises(ValueError, match="cap"):
        sk.spectral_smooth_([w], rule="cap")
    with pytest.raises(ValueError, match="min_rank"):
        sk.spectral_smooth_([w], min_rank=3, max_rank=2)
    bad = w.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        sk.spectral_smooth_([w, bad])

"""qk_max_logits (SPEC 8.1): every backend against the float64 reference on odd shapes, every float dtype, GQA,
non-contiguous inputs, causal and not; edge cases, errors, opcheck."""
import math

import pytest
import torch

import stabkernels as sk
from stabkernels.attention import qk_max_logits_reference

from .helpers import FLOAT_DTYPES, backend_params

BACKENDS = backend_params("qk_max_logits")

# (B, H, Hk, T, D): odd lengths and head dims, T across several query / key tiles of every backend (CPU 128 x 256,
# Triton 64 x 32, CUDA 32 x 32), D across several CUDA 64-wide and Triton 32-wide chunks, GQA groups of 1, 2, 3
SHAPES = [(1, 1, 1, 1, 1), (2, 3, 3, 7, 5), (1, 4, 2, 33, 17), (2, 6, 2, 70, 65), (1, 2, 1, 300, 40)]


def tolerance(q: torch.Tensor, k: torch.Tensor, scale: float) -> float:
    """A bound on the rounding of fp32 (fp64) math against the exact logits of the stored inputs: each dot of D
    products accumulates at most about D roundings of |q_i| . |k_j| (the bound gamma_D of a dot product), plus
    the scale's rounding; taken over the worst (i, j)."""
    eps = torch.finfo(torch.float64 if q.dtype == torch.float64 else torch.float32).eps
    D = q.shape[-1]
    if q.numel() == 0 or k.numel() == 0:
        return 0.0
    qa = q.abs().double().reshape(-1, D).amax(0)  # (D,): the largest |q| per dimension bounds every row
    ka = k.abs().double().reshape(-1, D).amax(0)
    bound = (qa * ka).sum().item()
    return (D + 2) * eps * scale * bound


def make(B, H, Hk, T, D, dtype, device, layout="contiguous"):
    g = torch.Generator().manual_seed(B * 1000 + H * 100 + T + D)
    q = (torch.randn(B, H, T, D, generator=g, dtype=torch.float64) * 2).to(dtype)
    k = (torch.randn(B, Hk, T, D, generator=g, dtype=torch.float64) * 2).to(dtype)
    if layout == "bthd":  # (B, T, H, D) storage seen as (B, H, T, D), as from a fused projection's view
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
        k = k.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "strided":  # every dimension strided, the last one too
        q = torch.zeros(B, H, T, 2 * D, dtype=dtype).copy_(q.repeat_interleave(2, dim=-1))[..., ::2]
        k = torch.zeros(B, Hk, T, 2 * D, dtype=dtype).copy_(k.repeat_interleave(2, dim=-1))[..., ::2]
    return q.to(device), k.to(device)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}Hk{}T{}D{}".format(*s))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_matches_float64_reference(backend, device, dtype, shape, causal):
    B, H, Hk, T, D = shape
    for layout in ("contiguous", "bthd", "strided"):
        q, k = make(B, H, Hk, T, D, dtype, device, layout)
        if layout != "contiguous":
            assert not q.is_contiguous() or T == 1 or H == 1
        got = sk.qk_max_logits(q, k, causal=causal, backend=backend)
        scale = 1 / math.sqrt(D)
        want = qk_max_logits_reference(q.double(), k.double(), scale, causal)
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), layout
        assert got.shape == (B, H), layout
        torch.testing.assert_close(got.double(), want, rtol=0, atol=tolerance(q, k, scale), msg=layout)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_gqa_pairs_query_head_with_key_head_h_over_group(backend, device):
    """Query head h reads key head h // (H // Hk) (not h % Hk): a large key on head 1 lifts query heads 2 and 3
    only."""
    q = torch.ones(1, 4, 5, 8, device=device)
    k = torch.zeros(1, 2, 5, 8, device=device)
    k[0, 1, 0] = 10.0  # key 0: visible to every query under the causal mask
    got = sk.qk_max_logits(q, k, scale=1.0, backend=backend)
    assert got.tolist() == [[0.0, 0.0, 80.0, 80.0]]


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_causal_mask_hides_the_future_exactly(backend, device):
    """The largest logit sits above the diagonal (query 3, key 40): causal ignores it, full attention finds it;
    the causal answer is then the best pair at or below the diagonal."""
    T, D = 70, 9
    q = torch.randn(1, 1, T, D, device=device) * 0.1
    k = torch.randn(1, 1, T, D, device=device) * 0.1
    q[0, 0, 3] = 3.0
    k[0, 0, 40] = 3.0
    full = sk.qk_max_logits(q, k, scale=1.0, causal=False, backend=backend)
    causal = sk.qk_max_logits(q, k, scale=1.0, causal=True, backend=backend)
    s = (q[0, 0].double() @ k[0, 0].double().T)
    assert abs(full.item() - s.max().item()) < 1e-4 and full.item() > 80
    assert abs(causal.item() - s.tril().masked_fill(torch.ones(T, T, dtype=torch.bool, device=device).triu(1),
                                                   -math.inf).max().item()) < 1e-4
    assert causal.item() < 20


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_three_dims_scale_and_non_causal_key_length(backend, device):
    q, k = torch.randn(4, 11, 6, device=device), torch.randn(2, 23, 6, device=device)
    got = sk.qk_max_logits(q, k, scale=0.25, causal=False, backend=backend)
    want = qk_max_logits_reference(q[None].double(), k[None].double(), 0.25, False)[0]
    assert got.shape == (4,)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=tolerance(q, k, 0.25))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nan_propagates_per_head_and_empty_sequences_give_minus_inf(backend, device):
    q, k = torch.randn(1, 3, 40, 8, device=device), torch.randn(1, 3, 40, 8, device=device)
    k[0, 1, 37, 2] = float("nan")  # key 37: seen by queries 37-39 under the causal mask
    got = sk.qk_max_logits(q, k, backend=backend)
    assert torch.isnan(got[0, 1]) and torch.isfinite(got[0, [0, 2]]).all()
    empty = sk.qk_max_logits(torch.randn(2, 3, 0, 8, device=device), torch.randn(2, 1, 0, 8, device=device),
                             backend=backend)
    assert empty.shape == (2, 3) and (empty == -math.inf).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_no_autograd_and_same_bits_twice(backend, device):
    q = torch.randn(2, 4, 50, 16, device=device, requires_grad=True)
    k = torch.randn(2, 2, 50, 16, device=device, requires_grad=True)
    a = sk.qk_max_logits(q, k, backend=backend)
    assert not a.requires_grad
    assert torch.equal(a, sk.qk_max_logits(q, k, backend=backend))


def test_errors_name_the_argument():
    q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="q must be"):
        sk.qk_max_logits(torch.randn(8, 16), k)
    with pytest.raises(ValueError, match="k must have q's number of dimensions"):
        sk.qk_max_logits(q, k[0])
    with pytest.raises(ValueError, match="multiple of k's head count"):
        sk.qk_max_logits(q, torch.randn(1, 3, 8, 16))
    with pytest.raises(ValueError, match="share one dtype"):
        sk.qk_max_logits(q, k.double())
    with pytest.raises(ValueError, match="k must be"):
        sk.qk_max_logits(q, torch.randn(1, 2, 8, 15))
    with pytest.raises(ValueError, match="causal=True needs as many keys"):
        sk.qk_max_logits(q, torch.randn(1, 2, 9, 16))
    with pytest.raises(ValueError, match="scale must be"):
        sk.qk_max_logits(q, k, scale=-1.0)
    with pytest.raises(TypeError, match="q must be float32"):
        sk.qk_max_logits(q.int(), k)
    if torch.device("meta") != q.device:
        with pytest.raises(ValueError, match="share one dtype and device"):
            sk.qk_max_logits(q, k.to("meta"))


def test_opcheck():
    q, k = torch.randn(2, 4, 9, 5), torch.randn(2, 2, 9, 5)
    for causal in (True, False):
        torch.library.opcheck(torch.ops.stabkernels.qk_max_logits, (q, k, 0.5, causal, "torch"))
        if sk.backend.why_unavailable("cpp", "cpu", "qk_max_logits") is None:
            torch.library.opcheck(torch.ops.stabkernels.qk_max_logits, (q, k, 0.5, causal, "cpp"))

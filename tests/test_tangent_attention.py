"""The JVP probe on attention models: fused SDPA kernels have no forward-mode AD, so the probe runs under the
math backend; another op without a forward-mode rule falls back to finite differences with one warning."""
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from stabkernels import tangent_logits
from stabkernels.optim import RadiusAdamW


class TinyAttentionLM(nn.Module):
    """(batch, seq) tokens -> an output with .logits (batch, seq, vocab), like a Hugging Face causal LM."""

    def __init__(self, vocab=11, d=16, heads=2):
        super().__init__()
        self.heads = heads
        self.emb, self.qkv, self.head = nn.Embedding(vocab, d), nn.Linear(d, 3 * d), nn.Linear(d, vocab)

    def forward(self, tokens):
        h = self.emb(tokens)
        b, t, d = h.shape
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in self.qkv(h).chunk(3, -1))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        return SimpleNamespace(logits=self.head(h + a))


def test_jvp_through_sdpa_matches_finite_differences_and_takes_logits_from_the_output():
    torch.manual_seed(0)
    model = TinyAttentionLM().double()
    tokens = torch.randint(0, 11, (3, 7))
    direction = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    norm = torch.sqrt(sum(d.square().sum() for d in direction.values()))
    direction = {n: d / norm for n, d in direction.items()}  # unit: fd's truncation error is eps * curvature
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback warning: the math backend has forward AD
        jvp = tangent_logits(model, tokens, direction, "jvp")
    fd = tangent_logits(model, tokens, direction, "fd", eps=1e-7)
    assert jvp.shape == (3 * 7, 11)  # every token position is a sample
    torch.testing.assert_close(jvp, fd, rtol=1e-4, atol=1e-6)


def test_radius_adamw_defaults_step_an_attention_model():
    torch.manual_seed(0)
    model = TinyAttentionLM()
    opt = RadiusAdamW(model.parameters(), lr=1e-2, model=model)
    tokens = torch.randint(0, 11, (4, 9))
    for _ in range(2):
        opt.zero_grad()
        logits = model(tokens).logits
        F.cross_entropy(logits[:, :-1].reshape(-1, 11), tokens[:, 1:].reshape(-1)).backward()
        opt.step()
    assert torch.isfinite(opt.last.rho) and all(torch.isfinite(p).all() for p in model.parameters())


class _NoForwardAD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.tanh()

    @staticmethod
    def backward(ctx, g):  # pragma: no cover - not used here
        raise NotImplementedError


def test_an_op_without_forward_ad_falls_back_to_finite_differences_with_one_warning():
    torch.manual_seed(0)
    lin = nn.Linear(5, 4).double()
    model = lambda_model = nn.Sequential(lin)
    model.forward = lambda x: _NoForwardAD.apply(lin(x))  # noqa: E731
    x = torch.randn(6, 5, dtype=torch.float64)
    direction = {n: torch.randn_like(p) for n, p in lambda_model.named_parameters()}
    with pytest.warns(RuntimeWarning, match="no forward-mode AD rule") as caught:
        got = tangent_logits(model, x, direction, "jvp")
        tangent_logits(model, x, direction, "jvp")
    assert len([w for w in caught if "forward-mode" in str(w.message)]) == 1
    want = (1 - torch.tanh(lin(x)) ** 2) * (x @ direction["0.weight"].T + direction["0.bias"])
    torch.testing.assert_close(got, want.detach(), rtol=1e-3, atol=1e-6)

"""QKClip (SPEC 8.2): the rescaled weights against a plain float64 reference of the rule, on Hugging Face GPT-2
(fused Conv1D c_attn), a LLaMA with grouped-query attention and RoPE, and the LM demo's block; heads below the
threshold unchanged bit for bit; the clipped heads' maxima at the threshold after the clip; the wrapper's state
dict; the registration API; errors."""
import math

import pytest
import torch
from torch import nn

import stabkernels as sk
from stabkernels.demo.lm import ByteLM
from stabkernels.optim import QKClip, QKClipOptimizer, Rows

transformers = pytest.importorskip("transformers")


# --------------------------------------------------------------------------------------------------
# plain float64 references: the logits from the attention inputs and the weights, and the rule


def causal_max(q, k, scale):
    """(H,) max over batch and causal pairs of scale q . k (q (B, H, T, D), k (B, H, T, D)), float64."""
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    T = q.shape[2]
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf)
    return s.amax(dim=(0, 2, 3))


def rule(weight_rows, S, tau, alpha, group):
    """The per-row factors of the q rows and the k rows of one layer: eta per key group from the group's max,
    q heads by eta^alpha, key heads by eta^(1 - alpha) (weight_rows = head_dim)."""
    Sg = S.view(-1, group).amax(1)
    eta = torch.where(Sg > tau, tau / Sg, torch.ones_like(Sg))
    fq = (eta ** alpha).repeat_interleave(group).repeat_interleave(weight_rows)
    fk = (eta ** (1 - alpha)).repeat_interleave(weight_rows)
    return fq, fk


def between(S):
    """A threshold strictly between the sorted middle values of S (some heads above, some below, margins)."""
    v = sorted(S.tolist())
    mid = len(v) // 2
    assert v[mid] - v[mid - 1] > 1e-3 * abs(v[mid]), v
    return (v[mid] + v[mid - 1]) / 2


def capture_inputs(modules):
    """Forward pre-hooks that keep each module's first input (and kwargs) of the latest call."""
    seen = {}
    hooks = []
    for i, m in enumerate(modules):
        def pre(mod, args, kwargs, i=i):
            seen[i] = (args[0] if args else kwargs["hidden_states"], kwargs)
        hooks.append(m.register_forward_pre_hook(pre, with_kwargs=True))
    return seen, hooks


# --------------------------------------------------------------------------------------------------
# GPT-2


def gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for blk in model.transformer.h:  # large logits on some heads
            blk.attn.c_attn.weight[:, :64].mul_(torch.linspace(1, 12, 64).repeat_interleave(1)[None, :])
    return model.train()


def test_gpt2_matches_the_rule_and_leaves_heads_below_the_threshold_bit_identical():
    model = gpt2()
    attns = [b.attn for b in model.transformer.h]
    seen, hooks = capture_inputs(attns)
    x = torch.randint(0, 50, (3, 17))
    clip = QKClip(model, threshold=1e9, alpha=0.3)
    assert [l.name for l in clip.layers] == ["transformer.h.0.attn", "transformer.h.1.attn"]
    model(x).logits.sum().backward()
    d, H = 32, 4
    hd = d // H
    refs = []
    for i, a in enumerate(attns):
        h = seen[i][0].double()
        qkv = h @ a.c_attn.weight.double() + a.c_attn.bias.double()
        q, k = (t.reshape(3, 17, H, hd).transpose(1, 2) for t in (qkv[..., :d], qkv[..., d:2 * d]))
        refs.append(causal_max(q, k, 1 / math.sqrt(hd)))
    S = torch.cat(refs)
    tau = between(S)
    clip.threshold = tau
    before = [a.c_attn.weight.detach().clone() for a in attns], [a.c_attn.bias.detach().clone() for a in attns]
    clip.step()
    torch.testing.assert_close(clip.last_max_logits, S, rtol=1e-5, atol=1e-5)
    for i, a in enumerate(attns):
        fq, fk = rule(hd, refs[i], tau, 0.3, 1)
        f = torch.cat([fq, fk, torch.ones(d, dtype=torch.float64)])
        want_w = (before[0][i].double() * f[None, :]).float()
        want_b = (before[1][i].double() * f).float()
        torch.testing.assert_close(a.c_attn.weight.detach(), want_w, rtol=2e-6, atol=0)
        torch.testing.assert_close(a.c_attn.bias.detach(), want_b, rtol=2e-6, atol=0)
        # heads at or below tau, and v, bit for bit; clipped heads changed
        for h in range(H):
            cols = [slice(h * hd, (h + 1) * hd), slice(d + h * hd, d + (h + 1) * hd)]
            for c in cols:
                same = torch.equal(a.c_attn.weight[:, c], before[0][i][:, c]) and \
                    torch.equal(a.c_attn.bias[c], before[1][i][c])
                assert same == bool(refs[i][h] <= tau), (i, h, refs[i][h].item(), tau)
        assert torch.equal(a.c_attn.weight[:, 2 * d:], before[0][i][:, 2 * d:])
    # exact for a plain projection: the first layer's clipped heads' maxima are now tau (its input is the same;
    # the second layer's input changed with the first layer's output)
    seen.clear()
    clip.threshold = 1e9
    model(x).logits.sum().backward()
    clip.step()
    after = clip.last_max_logits[:H]
    torch.testing.assert_close(after, torch.minimum(S[:H], torch.tensor(tau, dtype=torch.float64)), rtol=1e-5,
                               atol=1e-5)
    for h in hooks:
        h.remove()


def test_eval_and_no_grad_forwards_are_not_measured_and_nothing_happens_without_a_forward():
    model = gpt2()
    clip = QKClip(model, threshold=1e-3)
    w = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    clip.step()  # nothing measured
    model.eval()
    model(torch.randint(0, 50, (2, 9)))
    model.train()
    with torch.no_grad():
        model(torch.randint(0, 50, (2, 9)))
    clip.step()
    assert torch.equal(model.transformer.h[0].attn.c_attn.weight, w)
    assert clip.last_max_logits is None
    clip.remove()
    model(torch.randint(0, 50, (2, 9)))
    clip.step()
    assert torch.equal(model.transformer.h[0].attn.c_attn.weight, w)


# --------------------------------------------------------------------------------------------------
# LLaMA with grouped-query attention and RoPE


def llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                                   attention_bias=True)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(torch.linspace(1, 30, 48)[:, None])
            layer.self_attn.k_proj.weight.mul_(4.0)
    return model.train()


def rope(x, cos, sin):
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rot * sin[:, None]


def test_llama_gqa_after_rope_matches_the_rule():
    model = llama()
    attns = [l.self_attn for l in model.model.layers]
    seen, hooks = capture_inputs(attns)
    x = torch.randint(0, 50, (2, 21))
    clip = QKClip(model, threshold=1e9, alpha=0.5)
    assert len(clip.layers) == 2 and clip.layers[0].kv_heads == 2 and clip.layers[0].heads == 6
    model(x).logits.sum().backward()
    H, Hk, hd = 6, 2, 8
    refs = []
    for i, a in enumerate(attns):
        h, kw = seen[i]
        h = h.double()
        cos, sin = (t.double() for t in kw["position_embeddings"])
        q = (h @ a.q_proj.weight.double().T + a.q_proj.bias.double()).view(2, 21, H, hd).transpose(1, 2)
        k = (h @ a.k_proj.weight.double().T + a.k_proj.bias.double()).view(2, 21, Hk, hd).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        refs.append(causal_max(q, k.repeat_interleave(H // Hk, dim=1), a.scaling))
    S = torch.cat(refs)
    torch.testing.assert_close(clip._maxima, S, rtol=1e-5, atol=1e-4)
    groups = torch.cat([r.view(Hk, -1).amax(1) for r in refs])
    tau = between(groups)
    clip.threshold = tau
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    clip.step()
    for i, a in enumerate(attns):
        fq, fk = rule(hd, refs[i], tau, 0.5, H // Hk)
        pre = f"model.layers.{i}.self_attn."
        for proj, f in (("q_proj", fq), ("k_proj", fk)):
            for kind in ("weight", "bias"):
                old = before[pre + f"{proj}.{kind}"]
                new = getattr(getattr(a, proj), kind).detach()
                want = (old.double() * (f[:, None] if kind == "weight" else f)).float()
                torch.testing.assert_close(new, want, rtol=2e-6, atol=0)
                # rows of groups at or below tau: bit for bit
                rows_ok = (f == 1.0)
                assert torch.equal(new[rows_ok], old[rows_ok])
                assert (~rows_ok).any() and rows_ok.any()
    for n, p in model.named_parameters():
        if "q_proj" not in n and "k_proj" not in n:
            assert torch.equal(p, before[n]), n
    # RoPE is linear: the first layer's clipped groups' maxima are now tau (its input is unchanged)
    clip.threshold = 1e9
    model(x).logits.sum().backward()
    clip.step()
    new_groups = clip.last_max_logits[:H].view(Hk, -1).amax(1)
    torch.testing.assert_close(new_groups, torch.minimum(groups[:Hk], torch.tensor(tau, dtype=torch.float64)),
                               rtol=1e-5, atol=1e-4)
    for h in hooks:
        h.remove()


def test_qwen3_measures_after_its_per_head_qk_norm_and_rope():
    """Qwen3's attention normalises q and k per head (RMSNorm) before RoPE: the maxima are those logits."""
    torch.manual_seed(0)
    cfg = transformers.Qwen3Config(vocab_size=50, hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=6, num_key_value_heads=3, head_dim=8,
                                   max_position_embeddings=64)
    model = transformers.Qwen3ForCausalLM(cfg).train()
    a = model.model.layers[0].self_attn
    with torch.no_grad():
        a.q_norm.weight.copy_(torch.linspace(0.5, 6, 8))
        a.k_norm.weight.copy_(torch.linspace(3, 1, 8))
    seen, hooks = capture_inputs([a])
    clip = QKClip(model, threshold=1e9)
    assert len(clip.layers) == 1
    model(torch.randint(0, 50, (2, 13))).logits.sum().backward()
    h, kw = seen[0]
    h = h.double()
    cos, sin = (t.double() for t in kw["position_embeddings"])

    def rms(x, w, eps):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()

    q = rms((h @ a.q_proj.weight.double().T).view(2, 13, 6, 8), a.q_norm.weight, a.q_norm.variance_epsilon)
    k = rms((h @ a.k_proj.weight.double().T).view(2, 13, 3, 8), a.k_norm.weight, a.k_norm.variance_epsilon)
    q, k = rope(q.transpose(1, 2), cos, sin), rope(k.transpose(1, 2), cos, sin)
    want = causal_max(q, k.repeat_interleave(2, dim=1), a.scaling)
    torch.testing.assert_close(clip._maxima, want, rtol=1e-5, atol=1e-5)
    for hk in hooks:
        hk.remove()


# --------------------------------------------------------------------------------------------------
# the LM demo's block, the wrapper, the registration API


def byte_lm(seed=0, **kw):
    torch.manual_seed(seed)
    model = ByteLM(d=32, layers=2, heads=4, context=16, **kw)
    with torch.no_grad():
        for b in model.blocks:
            b.qkv.weight[:32].mul_(torch.linspace(1, 20, 32)[:, None])
    return model.train()


def lm_reference(model, seen, B, T):
    refs = []
    for i, b in enumerate(model.blocks):
        h = seen[i][0].double()
        qkv = h @ b.qkv.weight.double().T + b.qkv.bias.double()
        q, k, _ = qkv.view(B, T, 3, 4, 8).permute(2, 0, 3, 1, 4)
        refs.append(causal_max(q, k, 1 / math.sqrt(8)))
    return refs


def test_lm_block_wrapped_optimizer_matches_the_rule_and_passes_the_state_dict_through():
    model = byte_lm()
    seen, hooks = capture_inputs([b.qkv for b in model.blocks])
    inner = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    clip = QKClip(model, threshold=1e9, alpha=0.5)
    opt = clip.wrap(inner)
    assert isinstance(opt, torch.optim.Optimizer) and opt.param_groups is inner.param_groups
    x = torch.randint(0, 256, (3, 16))
    model(x).sum().backward()
    refs = lm_reference(model, seen, 3, 16)
    clip.threshold = between(torch.cat(refs))
    before = [b.qkv.weight.detach().clone() for b in model.blocks]
    opt.step()  # lr 0: only the clip moves the weights
    for i, b in enumerate(model.blocks):
        fq, fk = rule(8, refs[i], clip.threshold, 0.5, 1)
        f = torch.cat([fq, fk, torch.ones(32, dtype=torch.float64)])
        torch.testing.assert_close(b.qkv.weight.detach(), (before[i].double() * f[:, None]).float(), rtol=2e-6, atol=0)
        assert torch.equal(b.qkv.weight[f == 1.0], before[i][f == 1.0])
    sd = opt.state_dict()
    assert sd.keys() == inner.state_dict().keys() and "wrapper" not in sd
    other = QKClip(byte_lm(), threshold=5.0).wrap(torch.optim.SGD(byte_lm().parameters(), lr=0.0, momentum=0.9))
    other.load_state_dict(sd)
    assert other.param_groups[0]["momentum"] == 0.9
    for h in hooks:
        h.remove()


def test_qk_norm_block_measures_the_normalised_logits():
    model = byte_lm(qk_norm=True)
    outs = []
    hooks = [b.qk_norm.register_forward_hook(lambda m, a, o: outs.append(o)) for b in model.blocks]
    clip = QKClip(model, threshold=1e9)
    model(torch.randint(0, 256, (2, 16))).sum().backward()
    want = torch.cat([causal_max(q.double(), k.double(), 1 / math.sqrt(8)) for q, k in outs])
    torch.testing.assert_close(clip._maxima, want, rtol=1e-5, atol=1e-5)
    for h in hooks:
        h.remove()


def test_register_any_layout_and_accumulate_over_forwards():
    """A hand-made attention with separate q and k Linears, registered by hand; two forwards before a step: the
    maximum over both."""

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.wq, self.wk = nn.Linear(12, 12, bias=False), nn.Linear(12, 12, bias=False)

        def forward(self, x):
            B, T, _ = x.shape
            return self.wq(x).view(B, T, 2, 6).transpose(1, 2), self.wk(x).view(B, T, 2, 6).transpose(1, 2)

    torch.manual_seed(0)
    m = Attn()
    clip = QKClip(m, threshold=1e9)
    assert clip.layers == []
    clip.register(m, lambda mod, args, kwargs, out: out, heads=2, head_dim=6, q=[Rows(m.wq.weight)],
                  k=[Rows(m.wk.weight)], scale=1.0, name="attn")
    x1, x2 = torch.randn(1, 5, 12), torch.randn(1, 5, 12) * 3
    with torch.enable_grad():
        q1, k1 = m(x1)
        q2, k2 = m(x2)
    S = torch.maximum(causal_max(q1.detach().double(), k1.detach().double(), 1.0),
                      causal_max(q2.detach().double(), k2.detach().double(), 1.0))
    torch.testing.assert_close(clip._maxima, S, rtol=1e-5, atol=1e-5)
    clip.threshold = float(S.min()) / 2  # both heads clipped
    wq = m.wq.weight.detach().clone()
    clip.step()
    eta = clip.threshold / S
    torch.testing.assert_close(m.wq.weight.detach(), (wq.double() * eta.sqrt().repeat_interleave(6)[:, None]).float(),
                               rtol=2e-6, atol=0)
    assert clip.layer_max_logits()["attn"].shape == (2,)
    assert (clip._maxima == -math.inf).all()  # a new measurement starts


def test_nan_maxima_leave_the_weights_unchanged():
    model = byte_lm()
    clip = QKClip(model, threshold=1.0)
    model(torch.randint(0, 256, (2, 16))).sum().backward()
    clip._maxima.fill_(float("nan"))
    w = [b.qkv.weight.detach().clone() for b in model.blocks]
    clip.step()
    assert all(torch.equal(b.qkv.weight, wi) for b, wi in zip(model.blocks, w))


def test_errors():
    model = byte_lm()
    with pytest.raises(ValueError, match="threshold"):
        QKClip(model, threshold=0.0)
    with pytest.raises(ValueError, match="alpha"):
        QKClip(model, alpha=1.5)
    clip = QKClip(model)
    lin = nn.Linear(4, 8)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        clip.register(lin, lambda *a: None, heads=3, kv_heads=2, head_dim=2, q=[Rows(lin.weight)], k=[Rows(lin.weight)])
    with pytest.raises(ValueError, match="do not fit"):
        clip.register(lin, lambda *a: None, heads=4, head_dim=4, q=[Rows(lin.weight)], k=[Rows(lin.weight)])
    with pytest.raises(TypeError, match="clip must be a QKClip"):
        QKClipOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), object())


# --------------------------------------------------------------------------------------------------
# torch.compile of the wrapped step (as tests/test_optim_compile.py and test_optim_recompiles.py do for the others)


def compiled_run(compiled, steps=6):
    model = byte_lm()
    lr = torch.tensor(0.5)
    # SGD: traced AdamW takes another code path than eager's, a few ulps apart on step 1, which Adam's sign-like
    # first steps grow to 1e-3 by step 6 (measured, with the clip off too); SGD keeps the comparison about the clip
    opt = QKClip(model, threshold=3.0).wrap(torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9))
    step = torch.compile(opt.step, backend="eager") if compiled else opt.step
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))  # a new lr every step
    g = torch.Generator().manual_seed(2)
    graphs = []
    from torch._dynamo.utils import counters

    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the scheduler does not see the compiled step's calls
        for _ in range(steps):
            x = torch.randint(0, 256, (2, 17), generator=g)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
            step()
            sched.step()
            graphs.append(counters["stats"]["unique_graphs"])
    assert (opt.clip.last_max_logits > 3.0).any()
    return [p.detach().clone() for p in model.parameters()], graphs


def test_compiled_wrapped_step_matches_eager_without_recompiles():
    from torch._dynamo.utils import counters

    eager, _ = compiled_run(False)
    torch._dynamo.reset()
    counters.clear()
    compiled, graphs = compiled_run(True)
    assert graphs[-1] > 0  # something was compiled
    assert graphs[-1] == graphs[2], graphs  # no new graph after step 3
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()

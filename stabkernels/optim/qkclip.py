"""QK-clip (SPEC 8.2; Kimi K2's MuonClip, clip half): after each optimizer step, the query and key projection rows
of every attention head whose largest pre-softmax logit S on that step's training forward exceeded a threshold
tau are scaled by eta^alpha and eta^(1 - alpha), eta = tau / S, so that the head's logits shrink by eta.

How the logits are measured: forward hooks see each attention layer's q and k as they enter the scores (after
RoPE, after QK-LayerNorm) during training forwards and reduce them at once with
:func:`stabkernels.qk_max_logits` into a (heads,) maximum per layer, kept on the device; no activation outlives
the forward. Several forwards before a step (gradient accumulation, activation recomputation) take the maximum
over all of them. After the step: one MAX all-reduce of every layer's maxima packed in one vector (data
parallel: every rank applies the same factors), then the factors, computed and multiplied in on the device.
Nothing reads the device from the host.

Layouts found by :meth:`QKClip.__init__` in ``model``:
  - Hugging Face GPT-2 (``GPT2Attention``: fused ``c_attn`` Conv1D, weight (d, 3d), q columns first, then k);
  - Hugging Face LLaMA-like attention (``q_proj``/``k_proj`` Linears, ``head_dim``, grouped-query ``config
    .num_key_value_heads``, RoPE applied to q and k before the scores: measured after RoPE, and after the
    per-head ``q_norm``/``k_norm`` of Qwen3-like models, where the clip is then a heuristic);
  - :class:`stabkernels.demo.lm.Block` (fused ``qkv`` Linear(d, 3d), viewed as (B, T, 3, heads, hd)).
Any other layout: :meth:`QKClip.register` (a module to hook, a function that returns its (q, k), and where the
q and k rows of each head lie in which tensors).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .. import distributed
from ..attention import qk_max_logits
from ._wrapper import OptimizerWrapper


@dataclass(frozen=True)
class Rows:
    """Where one projection's per-head features lie in a tensor: along dimension ``dim`` of ``tensor`` (0 for an
    ``nn.Linear`` weight or any bias, 1 for a GPT-2 ``Conv1D`` weight), ``heads * head_dim`` features starting at
    ``start``, head-major (head h owns [start + h hd, start + (h + 1) hd))."""

    tensor: Tensor
    dim: int = 0
    start: int = 0


@dataclass
class _Layer:
    name: str
    heads: int
    kv_heads: int
    head_dim: int
    q: list  # of Rows
    k: list
    offset: int = 0  # of this layer's heads in the packed maxima
    handles: list = field(default_factory=list)


class QKClip:
    """QK-clip of every attention layer of ``model`` (SPEC 8.2).

    Two ways to use it (the same rule):

    * after the optimizer's step::

          clip = QKClip(model, threshold=100.0)
          ...
          loss.backward(); opt.step(); clip.step()

    * wrapping the optimizer (a :class:`torch.optim.Optimizer` whose ``step()`` is the inner step, then the
      clip; LR schedulers and GradScaler see the inner optimizer's groups)::

          opt = QKClip(model, threshold=100.0).wrap(torch.optim.AdamW(model.parameters()))

    Args:
        model: the model whose attention layers are found (see the module docstring); a
            ``DistributedDataParallel`` or FSDP2 model works as is. Layers of other layouts: :meth:`register`.
        threshold: tau; heads whose maximum logit is at most tau are left unchanged, bit for bit.
        alpha: the share of the scaling on the queries (eta^alpha) against the keys (eta^(1 - alpha)).
        process_group: the data-parallel group whose ranks agree on the maxima (default: the world).
        backend: :func:`stabkernels.qk_max_logits`'s backend.

    Grouped-query attention (fewer key heads than query heads): Megatron-LM's rule, one eta per key head from the
    maximum over its query group, applied to every q head of the group and to the key head. The maxima are
    measured on every pair (i, j <= i) of each sequence: padding is not masked, so a padded batch can only
    overestimate S (clip more). ``last_max_logits`` holds the packed maxima (float64, per layer in registration
    order; ``layer_max_logits()`` names them) that the latest :meth:`step` used, on the device.
    """

    def __init__(self, model: nn.Module, threshold: float = 100.0, alpha: float = 0.5, *, process_group=None,
                 backend: str = "auto"):
        if not threshold > 0 or not math.isfinite(threshold):
            raise ValueError(f"threshold must be a finite number > 0, got {threshold}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        self.threshold, self.alpha = float(threshold), float(alpha)
        self.process_group, self.backend = process_group, backend
        self.layers: list[_Layer] = []
        self._maxima: Tensor | None = None  # packed (total heads,) float64, -inf where nothing was measured
        self.last_max_logits: Tensor | None = None
        self._row_offsets: dict[int, int] = {}
        for name, module in model.named_modules():
            _find_layout(self, name, module)

    # ---- registration

    def register(self, module: nn.Module, capture: Callable, *, heads: int, head_dim: int,
                 q: Sequence[Rows], k: Sequence[Rows], kv_heads: int | None = None,
                 scale: float | None = None, causal: bool = True, name: str | None = None) -> None:
        """Adds one attention layer of any layout.

        ``capture(module, args, kwargs, output)`` runs as a forward hook of ``module`` (``kwargs`` included) and
        returns ``(q, k)`` as they enter the scores, (B, heads, T, head_dim) and (B, kv_heads, T, head_dim) (or
        None to skip that call); ``scale`` is the scores' scale (default 1/sqrt(head_dim)). ``q`` and ``k`` list
        where the projection's rows of each head lie (:class:`Rows`: the weight, and the bias if any); their
        scaling is exact when the captured q and k are linear in those rows (a plain projection, RoPE), a
        heuristic otherwise (a LayerNorm between them undoes it). Hooks are kept until :meth:`remove`."""
        kv_heads = heads if kv_heads is None else kv_heads
        if heads <= 0 or kv_heads <= 0 or heads % kv_heads:
            raise ValueError(f"heads ({heads}) must be a positive multiple of kv_heads ({kv_heads})")
        for what, rows, n in (("q", q, heads), ("k", k, kv_heads)):
            if not rows:
                raise ValueError(f"{what} must list at least one Rows (the {what} projection's weight)")
            for r in rows:
                if not isinstance(r, Rows):
                    raise TypeError(f"{what} must list Rows, got {type(r).__name__}")
                size = r.tensor.shape[r.dim] if r.dim < r.tensor.dim() else -1
                if size < r.start + n * head_dim or r.start < 0:
                    raise ValueError(f"{what}: {n} heads x {head_dim} features from {r.start} do not fit dimension "
                                     f"{r.dim} of a tensor of shape {tuple(r.tensor.shape)}")
        scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
        layer = _Layer(name or f"layer{len(self.layers)}", heads, kv_heads, head_dim, list(q), list(k),
                       offset=sum(l.heads for l in self.layers))

        def hook(mod, args, kwargs, output):
            if not mod.training or not torch.is_grad_enabled():
                return None  # evaluation forwards, probe forwards without grad: not the training forward
            got = capture(mod, args, kwargs, output)
            if got is not None:
                self._record(layer, qk_max_logits(*got, scale=scale, causal=causal, backend=self.backend))
            return None

        layer.handles.append(module.register_forward_hook(hook, with_kwargs=True))
        self.layers.append(layer)
        self._maxima = None

    def remove(self) -> None:
        """Removes every hook (the model is then as before)."""
        for layer in self.layers:
            for h in layer.handles:
                h.remove()
            layer.handles.clear()

    # ---- measurement

    def _record(self, layer: _Layer, m: Tensor) -> None:
        m = m.detach().reshape(-1, layer.heads).amax(0).to(torch.float64)  # over the batch
        if self._maxima is None or self._maxima.device != m.device:
            self._maxima = torch.full((sum(l.heads for l in self.layers),), -math.inf, dtype=torch.float64,
                                      device=m.device)
        part = self._maxima[layer.offset:layer.offset + layer.heads]
        torch.maximum(part, m, out=part)  # NaN propagates: a NaN head is left unchanged by the clip

    def layer_max_logits(self) -> dict[str, Tensor]:
        """``last_max_logits`` per layer name ((heads,) views), or {} before the first step."""
        if self.last_max_logits is None:
            return {}
        return {l.name: self.last_max_logits[l.offset:l.offset + l.heads] for l in self.layers}

    # ---- the clip

    def factors(self, maxima: Tensor, layer: _Layer) -> tuple[Tensor, Tensor]:
        """(q factor per q head, k factor per key head) of one layer from its (heads,) maxima: eta per key group
        from the group's maximum, exactly 1.0 where that maximum is at most the threshold (or NaN)."""
        group = maxima.view(layer.kv_heads, layer.heads // layer.kv_heads).amax(1)
        over = group > self.threshold
        eta = torch.where(over, self.threshold / torch.where(over, group, 1.0), 1.0)
        G = layer.heads // layer.kv_heads
        return eta.pow(self.alpha)[:, None].expand(-1, G).reshape(-1), eta.pow(1.0 - self.alpha)

    @torch.no_grad()
    def step(self) -> None:
        """Applies the clip for the forwards seen since the last call (call it after ``optimizer.step()``), then
        starts a new measurement. Without any measured forward it does nothing."""
        if self._maxima is None:
            return
        maxima = distributed.max_(self._maxima, self.process_group)  # one collective for every layer
        self.last_max_logits = maxima if maxima is not self._maxima else maxima.clone()
        # one factor vector per (tensor, dimension): a fused projection (q, k and v rows in one weight) is
        # multiplied once, by 1.0 exactly outside the clipped heads' rows
        todo: dict = {}
        for layer in self.layers:
            fq, fk = self.factors(maxima[layer.offset:layer.offset + layer.heads], layer)
            for rows, per_head in ((layer.q, fq), (layer.k, fk)):
                # (expand, not repeat_interleave: its output size would be read from the device)
                feats = per_head[:, None].expand(-1, layer.head_dim).reshape(-1)
                for r in rows:
                    key = (id(r.tensor), r.dim)
                    if key not in todo:
                        todo[key] = (r, torch.ones(r.tensor.shape[r.dim], dtype=feats.dtype, device=feats.device))
                    todo[key][1][r.start:r.start + feats.numel()] = feats
        for r, f in todo.values():
            self._scale(r, f)
        self._maxima.fill_(-math.inf)

    def _scale(self, r: Rows, f: Tensor) -> None:
        """Multiplies ``r.tensor`` by ``f`` (one factor per index of dimension ``r.dim``) in place; an FSDP2
        parameter (a DTensor sharded along dim 0) through its local shard, with its own rows' factors."""
        t = distributed.local(r.tensor)  # in place under step's no_grad (not through .data: torch.compile drops it)
        if r.dim == 0 and distributed.is_sharded(r.tensor):
            lo = self._row_offset(r.tensor)
            f = f[lo:lo + t.shape[0]]
        shape = [1] * t.dim()
        shape[r.dim] = t.shape[r.dim]
        t.mul_(f.to(t.device).view(shape))

    def _row_offset(self, t) -> int:
        key = id(t)
        if key not in self._row_offsets:
            lay = distributed.layout(t)
            self._row_offsets[key] = lay.offset // max(1, math.prod(t.shape[1:]))
        return self._row_offsets[key]

    def wrap(self, optimizer: torch.optim.Optimizer) -> "QKClipOptimizer":
        """``optimizer`` with this clip after each of its steps (:class:`QKClipOptimizer`)."""
        return QKClipOptimizer(optimizer, self)

    def __repr__(self) -> str:
        return (f"QKClip(threshold={self.threshold}, alpha={self.alpha}, layers="
                f"[{', '.join(f'{l.name}: {l.heads}/{l.kv_heads} heads' for l in self.layers)}])")


class QKClipOptimizer(OptimizerWrapper):
    """An optimizer followed by a :class:`QKClip` after each step. Its ``state_dict()`` *is* the inner
    optimizer's (QK-clip keeps no state across steps: threshold and alpha are configuration), and
    ``load_state_dict()`` takes it, so swapping the wrapper in or out leaves checkpoints unchanged."""

    state_kind = "QKClipOptimizer"

    def __init__(self, optimizer: torch.optim.Optimizer, clip: QKClip):
        super().__init__(optimizer)
        if not isinstance(clip, QKClip):
            raise TypeError(f"clip must be a QKClip, got {type(clip).__name__}")
        self.clip = clip

    def step(self, closure: Callable | None = None):
        loss = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        self.clip.step()
        return loss

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)


# --------------------------------------------------------------------------------------------------
# the layouts found by QKClip(model)


def _find_layout(clip: QKClip, name: str, module: nn.Module) -> None:
    # by the classes' names along the MRO (FSDP2 subclasses a sharded module's class; importing stabkernels.demo.lm or
    # transformers here would tie the optimizers to them)
    bases = {(c.__module__, c.__name__) for c in type(module).__mro__}
    if any(n == "GPT2Attention" for _, n in bases) and not getattr(module, "is_cross_attention", False):
        _register_gpt2(clip, name, module)
    elif hasattr(module, "q_proj") and hasattr(module, "k_proj") and hasattr(module, "head_dim") \
            and hasattr(getattr(module, "config", None), "num_attention_heads") \
            and hasattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb"):
        _register_llama(clip, name, module)
    elif ("stabkernels.demo.lm", "Block") in bases:
        _register_lm_block(clip, name, module)


def _register_gpt2(clip: QKClip, name: str, attn: nn.Module) -> None:
    H, hd, d = attn.num_heads, attn.head_dim, attn.embed_dim
    scale = (1.0 / math.sqrt(hd) if attn.scale_attn_weights else 1.0)
    if attn.scale_attn_by_inverse_layer_idx:
        scale /= float(attn.layer_idx + 1)

    def capture(mod, args, kwargs, out):
        B, T, _ = out.shape
        q, k, _ = out.split(d, dim=2)
        return q.view(B, T, H, hd).transpose(1, 2), k.view(B, T, H, hd).transpose(1, 2)

    w, b = attn.c_attn.weight, attn.c_attn.bias  # Conv1D: weight (d, 3d), out features along dim 1
    q = [Rows(w, 1, 0)] + ([Rows(b, 0, 0)] if b is not None else [])
    k = [Rows(w, 1, d)] + ([Rows(b, 0, d)] if b is not None else [])
    clip.register(attn.c_attn, capture, heads=H, head_dim=hd, q=q, k=k, scale=scale, name=name)


def _register_llama(clip: QKClip, name: str, attn: nn.Module) -> None:
    cfg, hd = attn.config, attn.head_dim
    H = cfg.num_attention_heads
    Hk = getattr(cfg, "num_key_value_heads", None) or H
    rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    if (q_norm is None) != (k_norm is None):
        raise ValueError(f"{name}: an attention with only one of q_norm and k_norm; register it by hand")
    stash: dict = {}

    # the attention module's arguments (RoPE's cos and sin) and q_proj's output, kept only until k_proj runs
    def pre(mod, args, kwargs):
        stash["pe"] = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)

    def keep_q(mod, args, out):
        if mod.training and torch.is_grad_enabled():
            stash["q"] = out

    def capture(mod, args, kwargs, out):
        q, pe = stash.pop("q", None), stash.pop("pe", None)
        if q is None:
            return None
        B, T = out.shape[:2]
        q, k = q.view(B, T, H, hd), out.view(B, T, Hk, hd)
        if q_norm is not None:  # Qwen3-style per-head QK-norm before RoPE: measured after it (the clip heuristic)
            with torch.no_grad():
                q, k = q_norm(q), k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        if pe is not None:
            cos, sin = pe
            q, k = rope(q, k, cos, sin)
        return q, k

    scale = float(getattr(attn, "scaling", 1.0 / math.sqrt(hd)))
    q = [Rows(attn.q_proj.weight, 0, 0)] + ([Rows(attn.q_proj.bias, 0, 0)] if attn.q_proj.bias is not None else [])
    k = [Rows(attn.k_proj.weight, 0, 0)] + ([Rows(attn.k_proj.bias, 0, 0)] if attn.k_proj.bias is not None else [])
    clip.register(attn.k_proj, capture, heads=H, kv_heads=Hk, head_dim=hd, q=q, k=k, scale=scale, name=name)
    layer = clip.layers[-1]
    layer.handles.append(attn.register_forward_pre_hook(pre, with_kwargs=True))
    layer.handles.append(attn.q_proj.register_forward_hook(keep_q))


def _register_lm_block(clip: QKClip, name: str, block: nn.Module) -> None:
    H = block.heads
    d = block.qkv.out_features // 3
    hd = d // H
    if block.qk_norm is not None:
        # the logits are those of the normalised q and k: hook the norm's output (scaling qkv's rows is undone by
        # the norm: the measurement is exact, the clip then a heuristic that does nothing; SPEC 8.2)
        module = block.qk_norm

        def capture(mod, args, kwargs, out):
            return out
    else:
        module = block.qkv

        def capture(mod, args, kwargs, out):
            B, T, _ = out.shape
            q, k, _ = out.view(B, T, 3, H, hd).permute(2, 0, 3, 1, 4)
            return q, k
    w, b = block.qkv.weight, block.qkv.bias  # Linear(d, 3d): out features along dim 0, q rows then k rows
    q = [Rows(w, 0, 0)] + ([Rows(b, 0, 0)] if b is not None else [])
    k = [Rows(w, 0, d)] + ([Rows(b, 0, d)] if b is not None else [])
    clip.register(module, capture, heads=H, head_dim=hd, q=q, k=k, name=name)

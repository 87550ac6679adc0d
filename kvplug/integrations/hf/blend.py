"""Blending on transformers (5.x) models: the HF reference path of :mod:`kvplug.methods.blend`.

::

    from kvplug.integrations.hf.blend import blend_prefill, compute_segment
    from kvplug.methods.blend import get_strategy

    segs = [compute_segment(model, doc_ids, prefix=system_ids) for doc_ids in docs]   # once, stored by blend key
    res = blend_prefill(model, prompt_ids, spans, segs, get_strategy("cacheblend", recompute_ratio=0.3))
    res.logits            # the last prompt token's logits
    res.generate(16)      # greedy continuation on the blended cache
    res.cache()           # a DynamicCache for model.generate (feed prompt + [res.logits.argmax()])
    res.flop_fraction     # decoder FLOPs of this prefill / those of a full prefill

How it runs: the prompt goes through the model's own decoder layers, driven layer by layer (batch 1). The session
holds every layer's K/V for all prompt rows: reused rows start with the stored KV (keys re-rotated to their new
positions with :func:`~kvplug.methods.blend.rerotate` and each layer's own RoPE), the others are filled as they are
computed. A layer runs on a subset of rows (``h[rows]``, the rows' positions and rotary embeddings); the session
is the layers' ``past_key_values``, so each attention writes its fresh K/V over those rows and attends over the
fused K/V with a mask built from positions (causal, plus the sliding window on Gemma-3's local layers). Dynamic
strategies run every row up to their check layers, then keep the rows the strategy selects; static ones start
from their selection. Layer-0 K/V of every reused row is compared with the loaded one first (it depends on the
token alone): a segment that does not match (another model, corrupted bytes, wrong tokens) is refused and computed
fresh (:attr:`BlendResult.refused`). A strategy's guard falls back to a full prefill with a reason
(:attr:`BlendResult.fallback`, logged). APE changes attention itself (parallel contexts sharing one position
range, a temperature and a scaled log-sum-exp); it runs only here. KVShare's decode-stage recompute runs in
:meth:`BlendResult.step` (HF only). Supported families: those whose decoder layers take ``position_embeddings``
and call ``past_key_values.update`` (Llama, Mistral, Qwen2, Qwen3, Gemma-3 text); others raise a clear error.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, DynamicCache

from kvplug.integrations.hf.cache import layer_types
from kvplug.methods.blend.rope import rerotate, rope_for_layer
from kvplug.methods.blend.segments import SegmentKV, tokens_digest
from kvplug.methods.blend.strategies import (
    BlendInput,
    BlendStrategy,
    KVShare,
    corrupt_segments,
    token_deviation,
)
from kvplug.methods.rope import Rope

log = logging.getLogger("kvplug.blend")

IMPL = "kvplug_blend"
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
_ACTIVE: dict[int, _Session] = {}


def _blend_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, Tensor | None]:
    """The ``kvplug_blend`` attention implementation: delegates to the active session."""
    sess = _ACTIVE.get(id(module.config))
    if sess is None:
        raise RuntimeError("kvplug_blend attention called outside a blending session")
    return sess.attend(module, query, key, value, scaling, kwargs), None


AttentionInterface.register(IMPL, _blend_attention)


def _text(model: nn.Module) -> tuple[Any, nn.Module]:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    base = getattr(model, "model", model)
    base = getattr(base, "language_model", base)
    return config, base


def check_supported(model: nn.Module) -> None:
    """Raise a clear error for a model the blending path cannot drive."""
    config, base = _text(model)
    kind = getattr(config, "model_type", "?")
    missing = [a for a in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(base, a)]
    if kind not in SUPPORTED or missing:
        why = f" (no {', '.join(missing)})" if missing else ""
        raise NotImplementedError(
            f"blending on the HF path supports {', '.join(SUPPORTED)}; this model is {kind!r}{why}"
        )


def linear_params(layer: nn.Module) -> tuple[int, int]:
    """(all linear weights of a decoder layer, those of its attention projections)."""
    total = sum(m.weight.numel() for m in layer.modules() if isinstance(m, nn.Linear))
    attn = getattr(layer, "self_attn", None)
    proj = sum(m.weight.numel() for m in attn.modules() if isinstance(m, nn.Linear)) if attn is not None else 0
    return total, proj


@dataclass
class _Ape:
    context: Tensor  # bool [N]: context rows (attended with temperature, non-causally)
    start: int  # first position after every context (rows at or past it see the contexts)
    temperature: float
    scale: float


class _Session:
    """One request's K/V for every layer plus the machinery to run rows of it through the model."""

    def __init__(self, model: nn.Module, ids: Tensor, positions: Tensor) -> None:
        check_supported(model)
        self.model = model
        self.config, self.base = _text(model)
        self.num_layers = int(self.config.num_hidden_layers)
        self.types = layer_types(self.config)
        self.dtype = next(model.parameters()).dtype
        self.device = next(model.parameters()).device
        self.ids = ids.to(self.device).flatten()
        self.pos = positions.to(self.device).flatten().long()
        n = self.ids.numel()
        heads = int(self.config.num_key_value_heads)
        dim = int(getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads)
        self.heads, self.head_dim = heads, dim
        self.k = [torch.zeros(1, heads, n, dim, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.rows = torch.arange(n, device=self.device)
        self.ape: _Ape | None = None
        self.probe = False
        self.capture_layers: set[int] = set()
        self.captured: dict[int, tuple[Tensor, Tensor, Tensor, Tensor]] = {}  # layer -> fresh k, v, old k, v
        self.record_layers: set[int] = set()
        self.recorded: dict[int, Tensor] = {}  # layer -> attention probabilities [Hq, S, N]
        self.flops = 0.0
        self._lin = [linear_params(la) for la in self.base.layers[: self.num_layers]]
        self._pe_cache: dict[tuple[str | None, int], tuple[Tensor, Tensor]] = {}
        self._ropes: list[Rope] | None = None
        rot = self.base.rotary_emb
        self._typed_rope = isinstance(getattr(rot, "rope_type", None), dict)

    # -- the cache interface the attention layers call -----------------------------------------------------------
    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if self.probe:
            self.captured[layer_idx] = (
                key,
                value,
                self.k[layer_idx][:, :, self.rows],
                self.v[layer_idx][:, :, self.rows],
            )
            return key, value
        kk, vv = self.k[layer_idx], self.v[layer_idx]
        if layer_idx in self.capture_layers:
            self.captured[layer_idx] = (key, value, kk[:, :, self.rows].clone(), vv[:, :, self.rows].clone())
        kk[:, :, self.rows] = key.to(kk.dtype)
        vv[:, :, self.rows] = value.to(vv.dtype)
        return kk, vv

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.ids.numel())

    # -- rows, positions, RoPE -------------------------------------------------------------------------------------
    def ropes(self) -> list[Rope]:
        if self._ropes is None:
            seq = int(self.pos.max()) + 1 if self.pos.numel() else 1
            self._ropes = [rope_for_layer(self.config, i, seq_len=seq) for i in range(self.num_layers)]
        return self._ropes

    def load(self, start: int, seg: SegmentKV, positions: Tensor) -> None:
        """Write a stored segment into rows ``start:start+N`` with its keys re-rotated to ``positions``."""
        end = start + seg.num_tokens
        for i, rope in enumerate(self.ropes()):
            k = seg.keys(i).to(self.device).transpose(0, 1)  # [H, N, D]
            k = rerotate(k, seg.positions.to(self.device), positions.to(self.device), rope)
            self.k[i][0, :, start:end] = k.to(self.dtype)
            self.v[i][0, :, start:end] = seg.values(i).to(self.device).transpose(0, 1).to(self.dtype)

    def append(self, ids: Sequence[int], positions: Tensor | None = None) -> Tensor:
        """New rows at the end (K/V filled when they are computed); returns their indices."""
        n0 = self.ids.numel()
        new = torch.as_tensor(list(ids), device=self.device, dtype=self.ids.dtype)
        if positions is None:
            positions = torch.arange(len(new), device=self.device) + int(self.pos.max()) + 1
        self.ids = torch.cat([self.ids, new])
        self.pos = torch.cat([self.pos, positions.to(self.device).long()])
        for i in range(self.num_layers):
            pad = self.k[i].new_zeros(1, self.heads, len(new), self.head_dim)
            self.k[i] = torch.cat([self.k[i], pad], dim=2)
            self.v[i] = torch.cat([self.v[i], pad.clone()], dim=2)
        if self.ape is not None:
            self.ape.context = torch.cat(
                [self.ape.context, torch.zeros(len(new), dtype=torch.bool, device=self.device)]
            )
        return torch.arange(n0, n0 + len(new), device=self.device)

    def _pe(self, layer: int, rows: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        kind = self.types[layer] if self._typed_rope else None
        key = (kind, self.pos.numel())
        if key not in self._pe_cache:
            self._pe_cache = {k: v for k, v in self._pe_cache.items() if k[1] == self.pos.numel()}
            pos = self.pos.unsqueeze(0)
            rot = self.base.rotary_emb
            self._pe_cache[key] = rot(h, pos, kind) if kind is not None else rot(h, pos)
        cos, sin = self._pe_cache[key]
        return cos[:, rows], sin[:, rows]

    def embed(self, rows: Tensor) -> Tensor:
        return self.base.embed_tokens(self.ids[rows].unsqueeze(0))

    # -- running layers --------------------------------------------------------------------------------------------
    def run(self, h: Tensor, rows: Tensor, layers: range) -> Tensor:
        """Run ``h [1, S, hidden]`` (rows ``rows``) through ``layers``; returns the new hidden states."""
        for i in layers:
            self.layer, self.rows = i, rows
            out = self.base.layers[i](
                h,
                attention_mask=None,
                position_embeddings=self._pe(i, rows, h),
                position_ids=self.pos[rows].unsqueeze(0),
                past_key_values=self,
                use_cache=True,
            )
            h = out[0] if isinstance(out, tuple) else out
            self.flops += 2.0 * self._lin[i][0] * rows.numel()
        return h

    def probe_layer0(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Fresh and loaded layer-0 K/V of ``rows`` (projections only: no attention, no MLP, no write)."""
        layer = self.base.layers[0]
        self.layer, self.rows, self.probe = 0, rows, True
        try:
            h = layer.input_layernorm(self.embed(rows))
            layer.self_attn(
                hidden_states=h,
                position_embeddings=self._pe(0, rows, h),
                attention_mask=None,
                position_ids=self.pos[rows].unsqueeze(0),
                past_key_values=self,
            )
        finally:
            self.probe = False
        self.flops += 2.0 * self._lin[0][1] * rows.numel()
        return self.captured.pop(0)

    def logits(self, h_last: Tensor) -> Tensor:
        out = self.model.lm_head(self.base.norm(h_last))
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            out = torch.tanh(out / cap) * cap
        return out.float().flatten()

    # -- attention -------------------------------------------------------------------------------------------------
    def visible(self, qpos: Tensor, window: int | None) -> Tensor:
        kpos = self.pos
        vis = kpos.unsqueeze(0) <= qpos.unsqueeze(1)
        if window:
            vis &= (qpos.unsqueeze(1) - kpos.unsqueeze(0)) < window
        return vis

    def attend(self, module: nn.Module, q: Tensor, k: Tensor, v: Tensor, scaling: float | None, kw: dict) -> Tensor:
        s_len = q.shape[-2]
        if self.probe:
            return q.new_zeros(1, s_len, q.shape[1], v.shape[-1])
        scale = scaling if scaling is not None else q.shape[-1] ** -0.5
        window = getattr(module, "sliding_window", None) or kw.get("sliding_window")
        qpos = self.pos[self.rows]
        groups = q.shape[1] // k.shape[1]
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        softcap = kw.get("softcap")
        vis = self.visible(qpos, window)
        layer = self.layer
        record = layer in self.record_layers
        if self.ape is not None:
            out, pairs = self._attend_ape(q, k, v, scale, softcap, qpos, window)
        elif not record and not softcap:
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=vis.view(1, 1, *vis.shape), scale=scale
            )
            pairs = int(vis.sum())
        else:
            s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
            if softcap:
                s = torch.tanh(s / softcap) * softcap
            p = torch.softmax(s.masked_fill(~vis, float("-inf")), dim=-1)
            if record:
                self.recorded[layer] = p[0].detach()
            out = torch.matmul(p, v.float()).to(q.dtype)
            pairs = int(vis.sum())
        self.flops += 4.0 * q.shape[1] * q.shape[-1] * pairs
        return out.transpose(1, 2).contiguous()

    def _attend_ape(
        self, q: Tensor, k: Tensor, v: Tensor, scale: float, softcap: float | None, qpos: Tensor, window: int | None
    ) -> tuple[Tensor, int]:
        """APE: contexts non-causal with temperature T, the rest causal; merged by log-sum-exp with the context's
        scaled by S x T (as the official code does)."""
        ape = self.ape
        assert ape is not None
        kpos = self.pos
        near = torch.ones(len(qpos), len(kpos), dtype=torch.bool, device=q.device)
        if window:
            near = (qpos.unsqueeze(1) - kpos.unsqueeze(0)).abs() < window
        ctx = ape.context.unsqueeze(0) & (qpos >= ape.start).unsqueeze(1) & near
        other = ~ape.context.unsqueeze(0) & (kpos.unsqueeze(0) <= qpos.unsqueeze(1)) & near
        s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        s_ctx = (s / ape.temperature).masked_fill(~ctx, float("-inf"))
        s_oth = s.masked_fill(~other, float("-inf"))
        lse_ctx = torch.logsumexp(s_ctx, dim=-1, keepdim=True)  # -inf where a row sees no context
        lse_oth = torch.logsumexp(s_oth, dim=-1, keepdim=True)
        has = torch.isfinite(lse_ctx)
        o_ctx = torch.matmul(torch.where(has, torch.exp(s_ctx - lse_ctx), 0.0), v.float())
        o_oth = torch.matmul(torch.exp(s_oth - lse_oth), v.float())
        w = torch.softmax(torch.cat([lse_ctx * (ape.scale * ape.temperature), lse_oth], dim=-1), dim=-1)
        out = torch.where(has, w[..., :1] * o_ctx + w[..., 1:] * o_oth, o_oth)
        if self.layer in self.record_layers:
            self.recorded[self.layer] = (
                torch.where(has, w[..., :1] * torch.exp(s_ctx - lse_ctx), 0.0)[0]
                + (w[..., 1:] * torch.exp(s_oth - lse_oth))[0]
            )
        return out.to(q.dtype), int((ctx | other).sum())

    def full_flops(self, n: int | None = None) -> float:
        """Decoder FLOPs of a plain prefill of the first ``n`` rows at positions ``0..n-1``."""
        n = self.ids.numel() if n is None else n
        hq, d = int(self.config.num_attention_heads), self.head_dim
        window = getattr(self.config, "sliding_window", None)
        total = 0.0
        for i in range(self.num_layers):
            pos = torch.arange(n, dtype=torch.float64)
            if self.types[i] == "sliding_attention" and window:
                pairs = float(torch.clamp(pos + 1, max=window).sum())
            else:
                pairs = n * (n + 1) / 2
            total += 2.0 * self._lin[i][0] * n + 4.0 * hq * d * pairs
        return total

    def kv(self, rows: slice) -> Tensor:
        """``[layers, 2, N, H, D]`` K/V of ``rows`` (float32)."""
        layers = [torch.stack([k[0, :, rows], v[0, :, rows]]) for k, v in zip(self.k, self.v, strict=True)]
        return torch.stack(layers).transpose(2, 3).float().cpu()


class _Active:
    """Swap the model's attention implementation for ``kvplug_blend`` while ``sess`` runs."""

    def __init__(self, sess: _Session) -> None:
        self.sess = sess

    def __enter__(self) -> _Session:
        cfgs = {id(c): c for c in (self.sess.model.config, self.sess.config)}
        if any(id(c) in _ACTIVE for c in cfgs.values()):
            raise RuntimeError("this model is already running a blending session")
        self.prev = [(c, c._attn_implementation) for c in cfgs.values()]
        for c in cfgs.values():
            c._attn_implementation = IMPL
            _ACTIVE[id(c)] = self.sess
        return self.sess

    def __exit__(self, *exc: object) -> None:
        for c, impl in self.prev:
            c._attn_implementation = impl
            _ACTIVE.pop(id(c), None)


# -- segments ------------------------------------------------------------------------------------------------------
def _encode(
    model: nn.Module, prefix: Sequence[int], tokens: Sequence[int], positions: Tensor | None, record: tuple[int, ...]
) -> _Session:
    """Run ``prefix + tokens`` through the model (every row, every layer) in a fresh session."""
    ids = torch.tensor(list(prefix) + list(tokens))
    sess = _Session(model, ids, torch.arange(len(ids)) if positions is None else positions)
    bad = [x for x in record if x >= sess.num_layers]
    if bad:
        raise ValueError(f"attention statistics asked of layers {bad}; the model has {sess.num_layers}")
    sess.record_layers = set(record)
    rows = torch.arange(len(ids), device=sess.device)
    with _Active(sess):
        sess.run(sess.embed(rows), rows, range(sess.num_layers))
    sess.record_layers = set()
    return sess


@torch.no_grad()
def compute_segment(
    model: nn.Module,
    tokens: Sequence[int],
    prefix: Sequence[int] = (),
    strategy: BlendStrategy | None = None,
    context: Sequence[str] = (),
) -> SegmentKV:
    """A segment's KV computed after ``prefix`` (``()``: in isolation), at positions ``len(prefix)...``, with the
    statistics ``strategy`` stores (Cache-Craft: each token's attention share on what precedes the segment;
    ``context``: the blend keys of the segments that preceded it, if it was computed after some)."""
    tokens, prefix = list(tokens), list(prefix)
    if not tokens:
        raise ValueError("compute_segment: no tokens")
    stat_layers: tuple[int, ...] = ()
    if strategy is not None and strategy.needs_attention_stats:
        stat_layers = tuple(getattr(strategy, "stat_layers", (1,)))
    sess = _encode(model, prefix, tokens, None, stat_layers)
    p = len(prefix)
    meta: dict[str, Any] = {}
    if strategy is not None and stat_layers:
        probs = torch.stack([sess.recorded[i][:, p:, :] for i in stat_layers])  # [layers, Hq, N, total]
        inter = probs[..., :p].sum(-1).mean(dim=(0, 1)) if p else torch.zeros(len(tokens))
        meta = strategy.segment_meta(inter=inter, context=list(context))
    return SegmentKV(tokens, sess.kv(slice(p, None)), torch.arange(p, p + len(tokens)), tokens_digest(prefix), meta)


# -- the blended prefill -------------------------------------------------------------------------------------------
@dataclass
class BlendResult:
    """A blended prefill: last-token logits, the K/V (in :attr:`session`), what was recomputed and what it cost."""

    logits: Tensor  # [vocab] of the last prompt token
    session: _Session
    strategy: BlendStrategy
    reused: Tensor  # bool [T]: rows whose stored KV was used (refused segments excluded)
    selected: Tensor  # bool [T]: rows computed in the last layer
    rows_per_layer: list[int]
    flops: float
    full_flops: float
    prompt_len: int
    fallback: str | None = None
    refused: list[int] = field(default_factory=list)
    deviation: Tensor | None = None  # [T] per-token deviation at the first check layer (relative for KVShare)
    check_layer: int | None = None
    check_hidden: Tensor | None = None  # [1, T, hidden] after the first check layer (KVShare's decode repair)
    repaired: Tensor | None = None  # bool [T]: rows recomputed during decoding (KVShare)
    decode_flops: float = 0.0
    decode_triggers: int = 0

    @property
    def flop_fraction(self) -> float:
        return self.flops / self.full_flops if self.full_flops else 1.0

    @property
    def recompute_fraction(self) -> float:
        """Reused rows computed at the last layer / reused rows."""
        n = int(self.reused.sum())
        return float((self.selected & self.reused).sum()) / n if n else 0.0

    @torch.no_grad()
    def step(self, token: int) -> Tensor:
        """Feed one token (the next position) and return its logits; KVShare may recompute stale rows first."""
        sess = self.session
        rows = sess.append([token])
        f0 = sess.flops
        with _Active(sess):
            h = sess.embed(rows)
            kv = self.strategy if isinstance(self.strategy, KVShare) else None
            if kv is None or self.check_hidden is None or self.check_layer is None:
                h = sess.run(h, rows, range(sess.num_layers))
            else:
                c = self.check_layer
                h = sess.run(h, rows, range(c + 1))
                h_c = h
                sess.record_layers = {c + 1}
                h = sess.run(h, rows, range(c + 1, sess.num_layers))
                sess.record_layers = set()
                again = self._kvshare_repair(kv, sess.recorded.pop(c + 1, None), c)
                if again:
                    h = sess.run(h_c, rows, range(c + 1, sess.num_layers))
        self.decode_flops += sess.flops - f0
        sess.flops = f0
        return sess.logits(h[:, -1])

    def _kvshare_repair(self, kv: KVShare, attn: Tensor | None, c: int) -> bool:
        if attn is None or self.deviation is None or self.check_hidden is None:
            return False
        sess = self.session
        if self.repaired is None:
            self.repaired = torch.zeros_like(self.reused)
        t = self.prompt_len
        stale = self.reused & ~self.selected & ~self.repaired
        budget = int(kv.decode_budget * int(self.reused.sum())) - int(self.repaired.sum())
        pick = kv.decode_select(attn[:, -1, :t], self.deviation, stale, budget)
        if pick is None or pick.numel() == 0:
            return False
        pick = pick.to(sess.device).sort().values
        sess.run(self.check_hidden[:, pick], pick, range(c + 1, sess.num_layers))
        self.repaired[pick] = True
        self.decode_triggers += 1
        return True

    @torch.no_grad()
    def score(self, answer: Sequence[int]) -> Tensor:
        """Teacher-forced logits ``[len(answer), vocab]``: row ``i`` predicts ``answer[i]`` (the first from the
        prefill). Feeds ``answer[:-1]`` one token at a time (decode steps)."""
        answer = [int(x) for x in answer]
        if len(answer) <= 1:
            return self.logits.unsqueeze(0)[: len(answer)]
        if isinstance(self.strategy, KVShare) and self.check_hidden is not None:
            return torch.stack([self.logits] + [self.step(tok) for tok in answer[:-1]])
        sess = self.session  # no decode-stage logic: all answer tokens in one causal pass
        rows = sess.append(answer[:-1])
        f0 = sess.flops
        with _Active(sess):
            h = sess.run(sess.embed(rows), rows, range(sess.num_layers))
        self.decode_flops += sess.flops - f0
        sess.flops = f0
        return torch.cat([self.logits.unsqueeze(0), sess.logits(h[0]).view(len(rows), -1)])

    @torch.no_grad()
    def generate(self, max_new_tokens: int, eos: int | None = None) -> list[int]:
        """Greedy continuation (decode steps on the blended K/V)."""
        out: list[int] = []
        logits = self.logits
        for i in range(max_new_tokens):
            tok = int(logits.argmax())
            out.append(tok)
            if (eos is not None and tok == eos) or i == max_new_tokens - 1:
                break
            logits = self.step(tok)
        return out

    def cache(self) -> DynamicCache:
        """A ``DynamicCache`` with the blended K/V of every row so far, for ``model.generate``: pass the prompt plus
        the first generated token (``res.logits.argmax()``) as input ids; positions continue from the cache length.
        Not for APE (its cache needs APE's attention)."""
        sess = self.session
        if sess.ape is not None:
            raise ValueError("an APE cache needs APE attention: use BlendResult.step / generate")
        cache = DynamicCache(config=sess.model.config)
        for i, layer in enumerate(cache.layers[: sess.num_layers]):
            layer.update(sess.k[i].clone(), sess.v[i].clone())
        return cache


def _check_inputs(ids: Tensor, segments: Sequence[tuple[int, int]], kvs: Sequence[SegmentKV]) -> None:
    if len(segments) != len(kvs):
        raise ValueError(f"{len(segments)} segment spans but {len(kvs)} stored segments")
    last = 0
    for (s, e), seg in zip(segments, kvs, strict=True):
        if not last <= s < e <= ids.numel():
            raise ValueError(f"segment [{s}, {e}) out of order or outside a prompt of {ids.numel()} tokens")
        if ids[s:e].tolist() != seg.tokens:
            raise ValueError(f"stored segment tokens differ from the prompt's tokens at [{s}, {e})")
        last = e


def _fits(sess: _Session, seg: SegmentKV) -> bool:
    return tuple(seg.kv.shape[:2]) == (sess.num_layers, 2) and tuple(seg.kv.shape[3:]) == (sess.heads, sess.head_dim)


@torch.no_grad()
def blend_prefill(
    model: nn.Module,
    input_ids: Sequence[int] | Tensor,
    segments: Sequence[tuple[int, int]],
    kvs: Sequence[SegmentKV],
    strategy: BlendStrategy,
    keys: Sequence[str] | None = None,
    verify: bool = True,
    integrity_tol: float = 1e-2,
) -> BlendResult:
    """Prefill ``input_ids`` reusing ``kvs`` at ``segments`` (token spans ``[start, end)``, in prompt order) with
    ``strategy`` (see the module docstring). ``keys``: the segments' blend keys (Cache-Craft's overlap and order).
    ``verify``: refuse segments whose layer-0 K/V does not match the model's (relative deviation > ``integrity_tol``)
    and compute them fresh instead."""
    ids = torch.as_tensor(input_ids).flatten().long()
    _check_inputs(ids, segments, kvs)
    if strategy.modifies_attention:
        return _ape_prefill(model, ids, segments, kvs, strategy, verify, integrity_tol)
    t = ids.numel()
    sess = _Session(model, ids, torch.arange(t))
    checks = tuple(strategy.check_layers)
    if any(c >= sess.num_layers for c in checks):
        raise ValueError(f"{strategy.name}: check layers {checks} beyond the model's {sess.num_layers} layers")
    plan = _Plan(sess, segments, kvs, keys)
    res = BlendResult(torch.empty(0), sess, strategy, plan.reused, plan.reused, [], 0.0, sess.full_flops(), t)
    all_rows = torch.arange(t, device=sess.device)
    with _Active(sess):
        if not checks:
            if verify and bool(plan.reused.any()):
                rr = plan.reused.nonzero().flatten()
                plan.drop(corrupt_segments(plan.input(0, rr, sess.probe_layer0(rr)), integrity_tol))
            sel = _checked(strategy, strategy.select(plan.input()), plan.reused, None)
            rows = sel.nonzero().flatten()
            h = sess.run(sess.embed(rows), rows, range(sess.num_layers))
            res.rows_per_layer = [rows.numel()] * sess.num_layers
        else:
            sess.capture_layers = {0, *checks} if verify else set(checks)
            rows, start = all_rows, 0
            h = sess.embed(rows)
            for c in checks:
                h = sess.run(h, rows, range(start, c + 1))
                res.rows_per_layer += [rows.numel()] * (c + 1 - start)
                start = c + 1
                if verify and 0 in sess.captured:
                    cap0 = sess.captured[0] if c == 0 else sess.captured.pop(0)
                    plan.drop(corrupt_segments(plan.input(0, all_rows, cap0), integrity_tol))
                if res.fallback is not None:
                    continue
                x = plan.input(c, rows, sess.captured.pop(c))
                if c == checks[0]:
                    res.fallback = strategy.guard(x)
                    if res.fallback is not None:
                        log.warning("kvplug blend: falling back to a full prefill: %s", res.fallback)
                        continue
                    res.check_layer, res.check_hidden = c, h.clone()
                    scores = getattr(strategy, "scores", None)
                    res.deviation = scores(x) if scores is not None else token_deviation(x.v_fresh, x.v_old)
                keep = _checked(strategy, strategy.select(x), plan.reused, x.active)[rows]
                rows, h = rows[keep], h[:, keep]
            h = sess.run(h, rows, range(start, sess.num_layers))
            res.rows_per_layer += [rows.numel()] * (sess.num_layers - start)
            sess.capture_layers = set()
            sess.captured.clear()
    res.selected = torch.zeros(t, dtype=torch.bool, device=sess.device)
    res.selected[rows] = True
    res.reused, res.refused = plan.reused, sorted(plan.refused)
    res.flops, sess.flops = sess.flops, 0.0
    res.logits = sess.logits(h[:, -1])
    return res


class _Plan:
    """The live segments of a prefill (refused ones drop out) and the :class:`BlendInput` built from them."""

    def __init__(
        self, sess: _Session, segments: Sequence[tuple[int, int]], kvs: Sequence[SegmentKV], keys: Sequence[str] | None
    ) -> None:
        self.sess = sess
        t = sess.ids.numel()
        self.reused = torch.zeros(t, dtype=torch.bool, device=sess.device)
        self.live: list[int] = []
        self.refused: list[int] = []
        for i, ((s, e), seg) in enumerate(zip(segments, kvs, strict=True)):
            if not _fits(sess, seg):
                self.refused.append(i)
                log.warning("kvplug blend: segment %d refused (KV shape %s does not fit)", i, tuple(seg.kv.shape))
                continue
            sess.load(s, seg, sess.pos[s:e])
            self.reused[s:e] = True
            self.live.append(i)
        self.spans = [tuple(segments[i]) for i in self.live]
        self.metas = [kvs[i].meta for i in self.live]
        self.keys = [keys[i] for i in self.live] if keys is not None else None

    def drop(self, bad: list[int]) -> None:
        """Refuse live segments ``bad`` (indices into the live list): their rows are computed fresh."""
        for j in sorted(bad, reverse=True):
            s, e = self.spans[j]
            self.reused[s:e] = False
            self.refused.append(self.live[j])
            log.warning("kvplug blend: segment %d refused (layer-0 K/V does not match this model)", self.live[j])
            del self.spans[j], self.metas[j], self.live[j]
            if self.keys is not None:
                del self.keys[j]

    def input(
        self, layer: int = -1, rows: Tensor | None = None, kv: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
    ) -> BlendInput:
        t = self.reused.numel()
        fresh: list[Tensor | None] = [None] * 4
        active = None
        if kv is not None and rows is not None:
            fresh = []
            for x in kv:  # [1, H, S, D] -> [T, H, D], zeros outside rows
                buf = torch.zeros(t, x.shape[1], x.shape[-1], device=x.device)
                buf[rows] = x[0].transpose(0, 1).float()
                fresh.append(buf)
            active = torch.zeros(t, dtype=torch.bool, device=self.reused.device)
            active[rows] = True
        return BlendInput(
            self.reused.clone(),
            list(self.spans),
            *fresh,
            layer,
            list(self.metas),
            active,
            list(self.keys) if self.keys is not None else None,
        )


def _checked(strategy: BlendStrategy, sel: Tensor, reused: Tensor, active: Tensor | None) -> Tensor:
    """A selection as the engine will use it: a bool [T] subset of the active rows holding every ~reused one and
    the last token (whose logits are the output)."""
    if sel.dtype != torch.bool or sel.shape != reused.shape:
        raise ValueError(f"{strategy.name}.select must return a bool [{reused.numel()}] mask, got {sel.dtype}")
    act = active if active is not None else torch.ones_like(reused)
    if bool((sel & ~act).any()):
        raise ValueError(f"{strategy.name}.select chose rows not computed at this layer")
    if bool((~reused & act & ~sel).any()):
        raise ValueError(f"{strategy.name}.select dropped tokens that are never reused")
    sel = sel.clone()
    sel[-1] = True
    return sel


def _ape_prefill(
    model: nn.Module,
    ids: Tensor,
    segments: Sequence[tuple[int, int]],
    kvs: Sequence[SegmentKV],
    strategy: BlendStrategy,
    verify: bool,
    tol: float,
) -> BlendResult:
    """APE: the prefix before the first segment at ``0..P-1``, every segment at ``P..P+len-1`` (parallel encoding,
    position reuse), the other tokens (separators, question) after ``P + longest segment``. A refused segment is
    encoded in place (after the prefix, at its APE positions)."""
    t = ids.numel()
    spans = [tuple(s) for s in segments]
    p = spans[0][0] if spans else t
    longest = max((e - s for s, e in spans), default=0)
    pos = torch.arange(t)
    context = torch.zeros(t, dtype=torch.bool)
    for s, e in spans:
        pos[s:e] = torch.arange(p, p + e - s)
        context[s:e] = True
    others = (~context).nonzero().flatten()
    others = others[others >= p]
    pos[others] = torch.arange(p + longest, p + longest + others.numel())
    sess = _Session(model, ids, pos)
    plan = _Plan(sess, spans, kvs, None)
    if verify and bool(plan.reused.any()):
        rr = plan.reused.nonzero().flatten()
        with _Active(sess):
            plan.drop(corrupt_segments(plan.input(0, rr, sess.probe_layer0(rr)), tol))
    for i in sorted(plan.refused):
        s, e = spans[i]
        sub = _encode(model, ids[:p].tolist(), ids[s:e].tolist(), torch.cat([pos[:p], pos[s:e]]), ())
        for li in range(sess.num_layers):
            sess.k[li][:, :, s:e] = sub.k[li][:, :, p:]
            sess.v[li][:, :, s:e] = sub.v[li][:, :, p:]
        sess.flops += sub.flops
    temperature, scale = float(strategy.temperature), float(strategy.scale)  # type: ignore[attr-defined]
    sess.ape = _Ape(context.to(sess.device), p + longest, temperature, scale)
    rows = (~context).nonzero().flatten().to(sess.device)
    with _Active(sess):
        h = sess.run(sess.embed(rows), rows, range(sess.num_layers))
    flops, sess.flops = sess.flops, 0.0
    sel = torch.zeros(t, dtype=torch.bool, device=sess.device)
    sel[rows] = True
    return BlendResult(
        sess.logits(h[:, -1]),
        sess,
        strategy,
        plan.reused,
        sel,
        [rows.numel()] * sess.num_layers,
        flops,
        sess.full_flops(),
        t,
        refused=sorted(plan.refused),
    )


def full_prefill_logits(model: nn.Module, input_ids: Sequence[int] | Tensor) -> Tensor:
    """The last-token logits of a plain forward (the reference a full-recompute blend must equal)."""
    ids = torch.as_tensor(input_ids).flatten().long().unsqueeze(0)
    with torch.no_grad():
        return model(ids, logits_to_keep=1).logits[0, -1].float()


__all__ = [
    "IMPL",
    "SUPPORTED",
    "BlendResult",
    "blend_prefill",
    "check_supported",
    "compute_segment",
    "full_prefill_logits",
    "linear_params",
]

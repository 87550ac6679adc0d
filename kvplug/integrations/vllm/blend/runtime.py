"""The blend step inside vLLM's forward: selective recompute over reused segment KV (CacheBlend's algorithm,
with any :mod:`kvplug.methods.blend` strategy choosing the rows).

For the requests of the step that carry a blend plan (their whole prompt is computed in this one step):

1. layers up to a strategy's check layer run on every row (fresh K/V of every token is written to the paged cache
   by the attention layers themselves, so no backend layout is hand-coded on that path);
2. at a check layer, the fresh K/V of the reused tokens is read back from the cache and compared with the loaded
   K/V (keys re-rotated to the new positions); the strategy picks the rows to keep computing (always every token
   that is not reused: system prompt, separators, question). Static strategies (EPIC, none) pick before layer 0;
3. the rows dropped there get the loaded K/V written into the cache for every later layer, and the later layers run
   on the kept rows only, with reduced attention metadata where each run of consecutive kept tokens is its own
   pseudo-sequence (query = the run, sequence = up to its last position, the request's block-table row). Rows of
   other requests in the batch run unchanged.

A request whose measured deviation trips the strategy's guard runs every row at every layer (a full prefill),
counted and logged. Everything that touches vLLM's internals goes through :mod:`kvplug.integrations.vllm._compat`.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from kvplug import metrics
from kvplug.methods.blend import BlendInput, BlendStrategy

log = logging.getLogger("kvplug.vllm.blend")


@dataclass
class LoadedSegment:
    """One reused segment of a prompt: its span and its stored KV, keys already at the new positions."""

    start: int
    end: int
    kv: torch.Tensor | None  # [layers, 2, n, H, D] in the cache dtype; None: not found (computed fresh)
    meta: dict[str, Any] = field(default_factory=dict)
    key: str = ""


@dataclass
class BlendPlan:
    """A request's blend step (worker side)."""

    req_id: str
    prompt: list[int]
    segments: list[LoadedSegment]
    strategy: BlendStrategy
    # outcome, read by the connector after the forward
    ran: bool = False
    fallback: str | None = None
    recomputed: int = 0  # reused tokens recomputed (selected), over every layer after the check
    reused_tokens: int = 0

    @property
    def reused(self) -> torch.Tensor:
        mask = torch.zeros(len(self.prompt), dtype=torch.bool)
        for s in self.segments:
            if s.kv is not None:
                mask[s.start : s.end] = True
        return mask

    def loaded(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Loaded ``(K, V)`` ``[T, H, D]`` of ``layer`` over the whole prompt (zeros where not reused)."""
        first = next(s.kv for s in self.segments if s.kv is not None)
        k = torch.zeros((len(self.prompt), *first.shape[3:]), dtype=first.dtype)
        v = torch.zeros_like(k)
        for s in self.segments:
            if s.kv is not None:
                k[s.start : s.end] = s.kv[layer, 0]
                v[s.start : s.end] = s.kv[layer, 1]
        return k, v


_ACTIVE: dict[str, BlendPlan] = {}
_LOCK = threading.Lock()
_PAGED: list[Any] = []


def set_paged_cache(paged: Any) -> None:
    """The connector's PagedKV of this worker (where the blend step reads and writes KV by token slot)."""
    _PAGED[:] = [paged]


def paged_cache() -> Any:
    return _PAGED[0] if _PAGED else None


def failed(e: BaseException) -> None:
    """The blend step raised: every plan of the step is a fallback (the stock forward runs instead)."""
    metrics.CONNECTOR_ERRORS.labels("vllm", "blend_forward").inc()
    log.error("kvplug: blend step failed (%s: %s); full prefill instead", type(e).__name__, e)
    for plan in _ACTIVE.values():
        plan.fallback = f"blend step error: {type(e).__name__}"
        plan.ran = False


def activate(plans: list[BlendPlan]) -> None:
    with _LOCK:
        _ACTIVE.clear()
        _ACTIVE.update({p.req_id: p for p in plans})


def active() -> dict[str, BlendPlan]:
    return _ACTIVE


def deactivate() -> list[BlendPlan]:
    with _LOCK:
        plans = list(_ACTIVE.values())
        _ACTIVE.clear()
        return plans


@dataclass
class _Row:
    """One request's rows in the batch."""

    index: int  # request row in the metadata
    start: int  # first token in the flattened batch
    end: int
    plan: BlendPlan | None
    keep: torch.Tensor  # bool [end - start]: rows still computed
    checks: tuple[int, ...] = ()


def blend_forward(model: Any, input_ids: torch.Tensor, positions: torch.Tensor, paged: Any) -> torch.Tensor | None:
    """Run the blend step for this batch, or None when no plan matches it (the caller runs the stock forward).
    ``model`` is a Llama-family ``*ForCausalLM`` (``model.model.layers``); ``paged`` the connector's PagedKV."""
    from kvplug.integrations.vllm import _compat

    plans = active()
    if not plans:
        return None
    ctx = _compat.forward_context()
    layers = model.model.layers
    names = [layer.self_attn.attn.layer_name for layer in layers]
    meta = _compat.layer_attention_metadata(ctx, names[0])
    order = _compat.last_batch_order()
    qsl = meta.query_start_loc.cpu().tolist()
    seq_lens = meta.seq_lens.cpu().tolist()
    n_req = len(qsl) - 1
    if len(order) < n_req:
        return None
    rows: list[_Row] = []
    matched = False
    for r in range(n_req):
        a, b = int(qsl[r]), int(qsl[r + 1])
        plan = plans.get(order[r])
        if plan is not None:
            ok = b - a == len(plan.prompt) and int(seq_lens[r]) == len(plan.prompt)
            ok = ok and input_ids[a:b].cpu().tolist() == plan.prompt
            if not ok:
                plan.fallback = "not scheduled as one whole-prompt step"
                plan = None
            elif not bool(plan.reused.any()):
                plan.fallback = "no segment found in the store"
                plan = None
        checks = tuple(plan.strategy.check_layers) if plan is not None else ()
        rows.append(_Row(r, a, b, plan, torch.ones(b - a, dtype=torch.bool), checks))
        matched |= plan is not None
    if not matched:
        return None
    return _run(model, layers, names, input_ids, positions, rows, meta, ctx, paged)


def _run(
    model: Any,
    layers: Any,
    names: list[str],
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    rows: list[_Row],
    meta: Any,
    ctx: Any,
    paged: Any,
) -> torch.Tensor:
    from kvplug.integrations.vllm import _compat

    m = model.model
    hidden = m.embed_input_ids(input_ids)
    residual: torch.Tensor | None = None
    slots_all = ctx.slot_mapping[names[0]]
    num_tokens = hidden.shape[0]  # padding rows (if any) are dropped with the others
    for row in rows:  # static strategies choose before layer 0
        if row.plan is not None and not row.checks:
            _select(row, -1, paged, slots_all, len(layers))
    idx = _active_index(rows, num_tokens)
    hidden, positions_k = hidden[idx], positions[idx]
    reduced = _reduced(rows, meta, slots_all, idx, model) if idx.numel() < num_tokens else None
    saved: dict[str, Any] = {}  # the step's own metadata of every layer swapped so far (restored at the end)
    try:
        for li, layer in enumerate(layers):
            if reduced is not None:
                saved.update(_compat.swap_layer_metadata(ctx, [names[li]], *reduced))
            hidden, residual = layer(positions_k, hidden, residual)
            if not any(li in row.checks for row in rows):
                continue
            for row in rows:
                if row.plan is not None and li in row.checks:
                    _select(row, li, paged, slots_all, len(layers))
            kept = _active_index(rows, num_tokens)
            if kept.numel() < idx.numel():
                pick = torch.isin(idx, kept)
                hidden, positions_k = hidden[pick], positions_k[pick]
                residual = residual[pick] if residual is not None else None
                idx = kept
                reduced = _reduced(rows, meta, slots_all, idx, model)
        hidden, _ = m.norm(hidden, residual)
    finally:
        _compat.restore_layer_metadata(ctx, saved)
    out = hidden.new_zeros((input_ids.shape[0], hidden.shape[-1]))
    out[idx] = hidden
    for row in rows:
        if row.plan is not None:
            row.plan.ran = True
    return out


def _active_index(rows: list[_Row], num_tokens: int) -> torch.Tensor:
    parts = [torch.nonzero(row.keep).flatten() + row.start for row in rows]
    return torch.cat(parts) if parts else torch.arange(num_tokens)


def _select(row: _Row, layer: int, paged: Any, slots_all: torch.Tensor, num_layers: int) -> None:
    """Ask the row's strategy which of its rows keep computing after ``layer``; write the loaded KV of the rows it
    drops into the cache for every later layer."""
    plan = row.plan
    assert plan is not None
    reused = plan.reused
    slots = slots_all[row.start : row.end].cpu()
    inp = BlendInput(
        reused=reused,
        segments=[(s.start, s.end) for s in plan.segments if s.kv is not None],
        layer=layer,
        meta=[s.meta for s in plan.segments if s.kv is not None],
        active=row.keep.clone(),
        keys=[s.key for s in plan.segments if s.kv is not None],
    )
    if layer >= 0:
        fresh = paged.read_slots(layer, slots)  # [2, T, H, D]: what the attention layer just wrote
        inp.k_fresh, inp.v_fresh = fresh[0].float(), fresh[1].float()
        k_old, v_old = plan.loaded(layer)
        inp.k_old, inp.v_old = k_old.float(), v_old.float()
    reason = plan.strategy.guard(inp)
    if reason is not None:
        plan.fallback = reason
        metrics.BLEND_FALLBACKS.labels("guard").inc()
        log.warning("kvplug: blend request %s falls back to a full prefill: %s", plan.req_id, reason)
        row.checks = ()
        return  # keep every row at every layer
    keep = plan.strategy.select(inp) & row.keep
    keep |= ~reused & row.keep
    keep[-1] = True  # the last prompt token's hidden state gives the first output token
    dropped = row.keep & ~keep
    if bool(dropped.any()):
        for li in range(layer + 1, num_layers):
            k, v = plan.loaded(li)
            paged.write_slots(li, slots[dropped], torch.stack([k[dropped], v[dropped]]))
    plan.reused_tokens = int(reused.sum())
    plan.recomputed = int((keep & reused).sum())
    row.keep = keep


def _reduced(rows: list[_Row], meta: Any, slots_all: torch.Tensor, idx: torch.Tensor, model: Any) -> tuple[Any, Any]:
    """Attention metadata and slot mapping for the kept rows: a pseudo-sequence per run of consecutive kept
    tokens of a blend request, the other requests unchanged."""
    from kvplug.integrations.vllm import _compat

    query_lens: list[int] = []
    seq_lens: list[int] = []
    table_rows: list[int] = []
    full_seq = meta.seq_lens.cpu().tolist()
    for row in rows:
        n = row.end - row.start
        if row.plan is None or bool(row.keep.all()):
            query_lens.append(n)
            seq_lens.append(int(full_seq[row.index]))
            table_rows.append(row.index)
            continue
        kept = torch.nonzero(row.keep).flatten().tolist()
        run_start = prev = kept[0]
        for t in [*kept[1:], None]:
            if t is not None and t == prev + 1:
                prev = t
                continue
            query_lens.append(prev - run_start + 1)
            seq_lens.append(prev + 1)  # positions are prompt indices: the whole prompt runs in this step
            table_rows.append(row.index)
            if t is not None:
                run_start = prev = t
    slots = slots_all[idx.to(slots_all.device)]
    return _compat.cpu_rows_metadata(meta, model.kvplug_vllm_config, query_lens, seq_lens, table_rows, slots), slots

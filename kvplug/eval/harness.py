"""The evaluation harness: methods x compression ratios x tasks on a real model, resumable, one table.

For each sample the context is prefilled once (all queries captured); every method then compresses a copy of
that cache (:meth:`KVPress.compressed_copy`, KV in bfloat16 as an engine stores it), and the question + answer
run on top, teacher-forced. Per (method, ratio, task) the harness records mean answer log-prob, exact match (%)
and, for ``ppl``, perplexity; KV bytes per token (what the method's output would occupy stored, full-attention
layers plus untouched sliding layers) and the extra prefill time (compression time over the prefill time of
the same sample, same run). Rows go to a JSONL file as they finish, so an interrupted run resumes where it was.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kvplug import methods
from kvplug.eval import tasks as T
from kvplug.methods.base import KVMethod

RATIOS = (0.25, 0.5, 0.75, 0.875)
#: Methods with no compression ratio (quantizers, ThinK's channel pruning, MiniCache's merge) run once each.
RATIO_FREE = ("kivi", "kvquant", "int8", "fp8", "think", "minicache")
DEFAULT_METHODS = (
    "streamingllm",
    "h2o",
    "snapkv",
    "pyramidkv",
    "tova",
    "scissorhands",
    "cake",
    "knorm",
    "random",
    "recent",
    "razorattention",
    "think",
    "minicache",
    "kivi",
    "kivi?bits=4",
    "kvquant",
    "int8",
    "fp8",
    "snapkv+kivi",
)


@dataclass(frozen=True)
class Suite:
    """Which samples to run; ``smoke`` is the CI size."""

    needle_lengths: tuple[int, ...] = (1024,)
    depths: tuple[float, ...] = (0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95)
    multikey: int = 4
    multivalue: int = 4
    qa: int = 8
    ppl: int = 3
    ppl_context: int = 1024
    ppl_target: int = 256
    tasks: tuple[str, ...] = T.TASKS
    #: True: the question is part of the compressed prompt (the papers' setting: SnapKV's observation window
    #: holds the question); False: compress the context alone, then ask (kvpress's query-agnostic setting).
    question_in_context: bool = True

    @classmethod
    def smoke(cls) -> Suite:
        return cls(
            needle_lengths=(384,), depths=(0.5,), multikey=1, multivalue=0, qa=1, ppl=1, ppl_context=256, ppl_target=64
        )


def build_samples(tok: Any, suite: Suite) -> list[T.Sample]:
    def enc(s: str) -> list[int]:
        return tok(s, add_special_tokens=False).input_ids

    def dec(ids: list[int]) -> str:
        return tok.decode(ids)

    out: list[T.Sample] = []
    for length in suite.needle_lengths:
        if "needle" in suite.tasks:
            out += T.needle(enc, length, list(suite.depths))
        if "multikey" in suite.tasks and suite.multikey:
            out += T.multikey(enc, length, suite.multikey)
        if "multivalue" in suite.tasks and suite.multivalue:
            out += T.multivalue(enc, length, suite.multivalue)
    if "qa" in suite.tasks and suite.qa:
        out += T.qa(suite.qa)
    if "ppl" in suite.tasks and suite.ppl:
        out += T.ppl(enc, dec, suite.ppl_context, suite.ppl_target, suite.ppl)
    return out


def parse_method(spec: str, ratio: float | None) -> KVMethod | None:
    """``"snapkv"``, ``"kivi?bits=2"``, ``"snapkv+kivi"`` (an evictor wrapped by a quantizer), or ``"full"``."""
    if spec == "full":
        return None
    parts = spec.split("+")
    built = []
    for p in parts:
        name, _, query = p.partition("?")
        params: dict[str, Any] = {}
        for kv in filter(None, query.split("&")):
            k, _, v = kv.partition("=")
            params[k] = _num(v)
        if name not in RATIO_FREE and ratio is not None:
            params.setdefault("compression_ratio", ratio)
        built.append(methods.get(name, **params))
    if len(built) == 1:
        return built[0]
    return methods.compose(*built)


def _num(v: str) -> Any:
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def is_ratio_free(spec: str) -> bool:
    return all(p.partition("?")[0] in RATIO_FREE for p in spec.split("+"))


def plan(method_specs: Sequence[str], ratios: Sequence[float]) -> list[tuple[str, float | None]]:
    """(method spec, ratio) pairs: ratio-free methods once (ratio None), the rest at every ratio; ``full`` first."""
    out: list[tuple[str, float | None]] = [("full", None)]
    for m in method_specs:
        if is_ratio_free(m):
            out.append((m, None))
        else:
            out += [(m, r) for r in ratios]
    return out


class Results:
    """Append-only JSONL of finished rows; ``done`` answers whether a row exists (resume)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    try:
                        self.rows.append(json.loads(line))
                    except json.JSONDecodeError:  # a line cut by an interrupted run: redo that row
                        continue
        self._keys = {self.key(r) for r in self.rows}

    @staticmethod
    def key(r: dict[str, Any]) -> tuple:
        return (r["model"], r.get("setting", DEFAULT_SETTING), r["task"], r["sid"], r["method"], r["ratio"])

    def done(self, **k: Any) -> bool:
        return self.key(k) in self._keys

    def add(self, row: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a+b") as f:  # a line cut by an interrupted run must not swallow this one
            f.seek(0, 2)
            if f.tell():
                f.seek(-1, 2)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write(json.dumps(row).encode() + b"\n")
        self.rows.append(row)
        self._keys.add(self.key(row))


@torch.no_grad()
def score_answer(model: Any, cache: Any, n_ctx: int, q_ids: list[int], a_ids: list[int]) -> tuple[float, bool, float]:
    """(mean answer log-prob, exact match, answer NLL sum) with the question and answer teacher-forced."""
    ids = torch.tensor([q_ids + a_ids])
    pos = torch.arange(n_ctx, n_ctx + ids.shape[1]).unsqueeze(0)
    logits = model(ids, past_key_values=cache, position_ids=pos).logits[0].float()
    # logits at position t predict token t+1; the answer starts after the question (ppl: one context token)
    if not q_ids:
        raise ValueError("score_answer needs at least one question token")
    start = len(q_ids) - 1
    pred = logits[start : start + len(a_ids)]
    lp = torch.log_softmax(pred, -1)
    target = torch.tensor(a_ids)
    tok_lp = lp.gather(1, target.view(-1, 1)).squeeze(1)
    exact = bool((pred.argmax(-1) == target).all())
    return float(tok_lp.mean()), exact, float(-tok_lp.sum())


@dataclass
class RunConfig:
    model_name: str
    method_specs: Sequence[str] = DEFAULT_METHODS
    ratios: Sequence[float] = RATIOS
    suite: Suite = Suite()
    kv_dtype: torch.dtype = torch.bfloat16

    @property
    def setting(self) -> str:
        """What makes rows comparable: the suite and the KV dtype (part of the resume key and of each row)."""
        return setting_of(self.suite, self.kv_dtype)


def setting_of(suite: Suite, kv_dtype: torch.dtype) -> str:
    body = json.dumps({**asdict(suite), "kv_dtype": str(kv_dtype)}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:12]


#: Rows written before settings were recorded ran the default suite with bfloat16 KV.
DEFAULT_SETTING = setting_of(Suite(), torch.bfloat16)


@torch.no_grad()
def evaluate(
    model: Any,
    tok: Any,
    cfg: RunConfig,
    results: Results,
    progress: Any | None = None,
) -> Results:
    """Run every (sample, method, ratio) not yet in ``results``; ``progress`` is a callable(advance=1) or None."""
    from kvplug.integrations.hf import KVPress

    samples = build_samples(tok, cfg.suite)
    pairs = plan(cfg.method_specs, cfg.ratios)
    for s in samples:
        todo = [
            (m, r)
            for m, r in pairs
            if not results.done(model=cfg.model_name, setting=cfg.setting, task=s.task, sid=s.sid, method=m, ratio=r)
        ]
        if not todo:
            if progress:
                progress(len(pairs))
            continue
        if progress:
            progress(len(pairs) - len(todo))
        a_ids = tok(s.answer, add_special_tokens=False).input_ids
        if s.task == "ppl" or cfg.suite.question_in_context:
            # the whole prompt is compressed; its last token then runs on the compressed cache
            prompt = tok(s.context + s.question).input_ids
            ctx_ids, q_ids = prompt[:-1], prompt[-1:]
        else:
            ctx_ids = tok(s.context).input_ids
            q_ids = tok(s.question, add_special_tokens=False).input_ids
        n = len(ctx_ids)
        press = KVPress(model, None, prefill=False, capture_all=True)
        with press:
            cache0 = press.new_cache()
            t0 = time.perf_counter()
            model(torch.tensor([ctx_ids]), past_key_values=cache0)
            prefill_s = time.perf_counter() - t0
            full_bytes = None
            for m, r in todo:
                method = parse_method(m, r)
                if s is samples[0]:  # the first call of a method pays one-off costs; time the steady state
                    press.compressed_copy(method, dtype=cfg.kv_dtype)
                t1 = time.perf_counter()
                cache, out = press.compressed_copy(method, dtype=cfg.kv_dtype)
                compress_s = time.perf_counter() - t1
                kv = sum(c.nbytes for c in out) + _sliding_bytes(cache, press.full_layers, cfg.kv_dtype)
                mean_lp, exact, nll = score_answer(model, cache, n, q_ids, a_ids)
                if full_bytes is None:
                    full_bytes = _full_bytes(press, cfg.kv_dtype)
                results.add(
                    {
                        "model": cfg.model_name,
                        "setting": cfg.setting,
                        "task": s.task,
                        "sid": s.sid,
                        "method": m,
                        "ratio": r,
                        "spec": method.spec if method is not None else "full",
                        "tokens": n,
                        "logprob": mean_lp,
                        "exact": exact,
                        "nll": nll,
                        "answer_tokens": len(a_ids),
                        "kv_bytes_per_token": kv / n,
                        "kv_fraction": kv / full_bytes,
                        "prefill_s": prefill_s,
                        "compress_s": compress_s,
                    }
                )
                if progress:
                    progress(1)
    return results


def _full_bytes(press: Any, dtype: torch.dtype) -> int:
    """Bytes of the uncompressed prefill KV at ``dtype`` (all layers)."""
    source = press.prefilled[0]
    esize = torch.empty((), dtype=dtype).element_size()
    total = sum(la.keys.numel() * esize * 2 for la in press.prefill_layers(cache=source))
    return total + _sliding_bytes(source, press.full_layers, dtype)


def _sliding_bytes(cache: Any, full_layers: Sequence[int], dtype: torch.dtype) -> int:
    esize = torch.empty((), dtype=dtype).element_size()
    total = 0
    for i, la in enumerate(cache.layers):
        if i not in full_layers and getattr(la, "is_initialized", False) and la.keys.numel():
            total += (la.keys.numel() + la.values.numel()) * esize
    return total


# ---- aggregation --------------------------------------------------------------------------------------------


@dataclass
class Cell:
    method: str
    ratio: float | None
    task: str
    n: int
    accuracy: float  # exact match, percent (ppl: perplexity)
    logprob: float
    kv_fraction: float
    kv_bytes_per_token: float
    prefill_overhead: float  # (prefill + compress) / prefill


def aggregate(rows: Iterable[dict[str, Any]], model: str | None = None) -> list[Cell]:
    """Cells per (method, ratio, task) for one model; rows of different settings are never mixed."""
    rows = [r for r in rows if model is None or r["model"] == model]
    settings = {r.get("setting", DEFAULT_SETTING) for r in rows}
    if len(settings) > 1:
        raise ValueError(f"results mix {len(settings)} settings ({sorted(settings)}): use one results file per run")
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["ratio"], r["task"]), []).append(r)
    cells = []
    for (m, ratio, task), rs in groups.items():
        n = len(rs)
        if task == "ppl":
            acc = math.exp(sum(r["nll"] for r in rs) / sum(r["answer_tokens"] for r in rs))
        else:
            acc = 100.0 * sum(r["exact"] for r in rs) / n
        cells.append(
            Cell(
                method=m,
                ratio=ratio,
                task=task,
                n=n,
                accuracy=acc,
                logprob=sum(r["logprob"] for r in rs) / n,
                kv_fraction=sum(r["kv_fraction"] for r in rs) / n,
                kv_bytes_per_token=sum(r["kv_bytes_per_token"] for r in rs) / n,
                prefill_overhead=sum((r["prefill_s"] + r["compress_s"]) / r["prefill_s"] for r in rs) / n,
            )
        )
    return sorted(cells, key=lambda c: (c.method != "full", c.method, c.ratio or 0.0, c.task))


def cells_to_dicts(cells: Sequence[Cell]) -> list[dict[str, Any]]:
    return [asdict(c) for c in cells]

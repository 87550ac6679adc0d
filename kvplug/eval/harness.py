"""The evaluation harness: methods x compression ratios x tasks x context lengths on a real model, resumable.

For each sample the context is prefilled once (every query captured); every method then compresses a copy of
that cache (:meth:`KVPress.compressed_copy`, KV in bfloat16 as an engine stores it), and the rest of the prompt
and the answer run on top, teacher-forced. Methods that share work on one prefill share it (H2O's attention sums,
KVzip's context reconstruction) and each is charged its full cost. Per row: exact match and token accuracy over
the answer's content tokens (:mod:`kvplug.eval.tasks`), their mean log-prob, KV bytes kept, and the extra
prefill time (compression time over the prefill time of the same sample, same run). Rows go to a JSONL file as
they finish, so an interrupted run resumes where it was, and runs with other lengths, sample counts or ratios
append to the same file.

Two settings (``Suite.question_in_context``): True compresses context + question and runs only the prompt's last
token on the compressed cache (the papers' setting: an observation window holds the question); False compresses
the context alone and asks afterwards (kvpress's query-agnostic setting). Both see the same tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvplug import methods
from kvplug.eval import tasks as T
from kvplug.eval.stats import wilson
from kvplug.eval.summary import PASS
from kvplug.methods.base import KVMethod

log = logging.getLogger(__name__)

RATIOS = (0.25, 0.5, 0.75, 0.875)
#: Methods with no compression ratio (quantizers, ThinK's channel pruning, MiniCache's merge) run once each.
RATIO_FREE = ("kivi", "kvquant", "int8", "fp8", "think", "minicache")
DEFAULT_METHODS = (
    "streamingllm",
    "h2o",
    "h2o?normalize=true",
    "snapkv",
    "snapkv?window_size=64&kernel_size=5&pooling=avg",
    "pyramidkv",
    "tova",
    "scissorhands",
    "cake",
    "knorm",
    "keydiff",
    "expectedattention",
    "kvzip",
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
#: Version of the task generators and scoring: rows of another version are never mixed with these.
TASKS_VERSION = 2


@dataclass(frozen=True)
class Suite:
    """Which samples to run: ``samples`` per (task, length); ``smoke`` is the CI size."""

    lengths: tuple[int, ...] = (1024, 2048, 4096)
    samples: int = 100
    tasks: tuple[str, ...] = T.TASKS
    ppl_target: int = 128
    ppl_samples: int = 25  # ppl windows per length (each scores ppl_target tokens: fewer samples suffice)
    #: True: the question is part of the compressed prompt (the papers' setting); False: compress the context
    #: alone, then ask (kvpress's query-agnostic setting).
    question_in_context: bool = True

    @classmethod
    def smoke(cls) -> Suite:
        return cls(lengths=(384,), samples=1, tasks=("needle", "multikey", "qa", "ppl"), ppl_target=32, ppl_samples=1)


def build_samples(tok: Any, suite: Suite) -> list[T.Sample]:
    """Samples in run order: index-major (sample 0 of every (task, length), then sample 1, ...), so an interrupted
    run leaves every cell with about the same count. Sample ``i`` of a (task, length) does not depend on
    ``suite.samples``, so a larger run extends a smaller one."""

    def enc(s: str) -> list[int]:
        return tok(s, add_special_tokens=False).input_ids

    def dec(ids: list[int]) -> str:
        return tok.decode(ids)

    unknown = set(suite.tasks) - set(T.TASKS)
    if unknown:
        raise ValueError(f"unknown task(s) {sorted(unknown)}; tasks are {', '.join(T.TASKS)}")
    cells: list[list[T.Sample]] = []
    n = suite.samples
    for length in suite.lengths:
        for task in T.TASKS:
            if task not in suite.tasks:
                continue
            if task == "needle":
                cells.append(T.needle(enc, length, n))
            elif task == "multikey":
                cells.append(T.multikey(enc, length, n))
            elif task == "multivalue":
                cells.append(T.multivalue(enc, length, n))
            elif task == "qa":
                cells.append(T.qa(enc, length, n))
            elif suite.ppl_samples:
                cells.append(T.ppl(enc, dec, length, suite.ppl_target, suite.ppl_samples))
    return [c[i] for i in range(max(map(len, cells), default=0)) for c in cells if i < len(c)]


@dataclass(frozen=True)
class Encoded:
    """A sample as tokens: ``context`` is compressed, ``prompt`` then runs on the compressed cache (at least one
    token), ``answer`` follows teacher-forced; ``scored[i]`` says whether answer token ``i`` is scored."""

    context: list[int]
    prompt: list[int]
    answer: list[int]
    scored: list[bool]


def encode(tok: Any, s: T.Sample, question_in_context: bool) -> Encoded:
    """Tokenize a sample. The context on its own (with the model's special tokens), then question + answer in one
    piece, split where the answer's content starts (offsets): a leading space the tokenizer splits off joins the
    question. Content tokens (a letter or digit in them) are scored; all of a ``ppl`` target is."""
    ctx = tok(s.context).input_ids
    if s.task == "ppl":
        ans = tok(s.answer, add_special_tokens=False).input_ids
        return Encoded(ctx[:-1], ctx[-1:], ans, [True] * len(ans))
    text = s.question + s.answer
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, spans = enc.input_ids, enc.offset_mapping
    start = len(s.question) + len(s.answer) - len(s.answer.lstrip())
    a0 = next((i for i, (_, e) in enumerate(spans) if e > start), None)
    if a0 is None or a0 == 0:
        raise ValueError(f"{s.task} {s.sid}: cannot split question and answer tokens")
    scored = [any(ch.isalnum() for ch in text[max(b, start) : e]) for b, e in spans[a0:]]
    q, a = ids[:a0], ids[a0:]
    if question_in_context:
        full = ctx + q
        return Encoded(full[:-1], full[-1:], a, scored)
    return Encoded(ctx, q, a, scored)


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
        if m == "full":
            continue
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
        return (r["model"], r.get("setting"), r["task"], r["sid"], r["method"], r["ratio"])

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
            f.flush()
        self.rows.append(row)
        self._keys.add(self.key(row))


@dataclass(frozen=True)
class Score:
    logprob: float  # mean log-prob of the scored tokens
    exact: bool  # every scored token is the greedy choice
    correct: int  # scored tokens that are
    scored: int
    nll: float  # sum of the scored tokens' negative log-probs


@torch.no_grad()
def score_answer(model: Any, cache: Any, n_ctx: int, e: Encoded) -> Score:
    """Run ``e.prompt + e.answer`` on ``cache`` (positions continue from ``n_ctx``), teacher-forced."""
    if not e.prompt:
        raise ValueError("score_answer needs at least one prompt token")
    ids = torch.tensor([e.prompt + e.answer])
    pos = torch.arange(n_ctx, n_ctx + ids.shape[1]).unsqueeze(0)
    logits = model(ids, past_key_values=cache, position_ids=pos).logits[0].float()
    start = len(e.prompt) - 1  # logits at t predict token t + 1
    pred = logits[start : start + len(e.answer)]
    target = torch.tensor(e.answer)
    keep = torch.tensor(e.scored, dtype=torch.bool)
    lp = torch.log_softmax(pred, -1).gather(1, target.view(-1, 1)).squeeze(1)[keep]
    hit = (pred.argmax(-1) == target)[keep]
    return Score(float(lp.mean()), bool(hit.all()), int(hit.sum()), int(keep.sum()), float(-lp.sum()))


@dataclass
class RunConfig:
    model_name: str
    method_specs: Sequence[str] = DEFAULT_METHODS
    ratios: Sequence[float] = RATIOS
    suite: Suite = Suite()
    kv_dtype: torch.dtype = torch.bfloat16
    #: Stop running methods on a (task, length) cell once the full cache confidently fails it (Wilson upper bound
    #: of its exact match below the pass mark after at least 10 samples): such cells are never ranked. The full
    #: cache itself still runs every sample (the calibration table reports it).
    skip_failing: bool = True

    @property
    def setting(self) -> str:
        """What makes rows comparable (part of the resume key and of each row): the task version, the setting,
        the ppl target and the KV dtype; lengths and sample counts are per row."""
        return setting_of(self.suite, self.kv_dtype)


def setting_of(suite: Suite, kv_dtype: torch.dtype) -> str:
    body = json.dumps(
        {
            "tasks_version": TASKS_VERSION,
            "question_in_context": suite.question_in_context,
            "ppl_target": suite.ppl_target,
            "kv_dtype": str(kv_dtype),
        },
        sort_keys=True,
    )
    return hashlib.sha256(body.encode()).hexdigest()[:12]


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
    built = {(m, r): parse_method(m, r) for m, r in pairs}  # fail on a bad spec before any work
    warm: set[tuple[str, float | None]] = set()
    full: dict[tuple[str, int], list[bool]] = {}  # (task, length) -> the full cache's exact matches so far
    for r in results.rows:
        if r["model"] == cfg.model_name and r.get("setting") == cfg.setting and r["method"] == "full":
            full.setdefault((r["task"], r["length"]), []).append(bool(r["exact"]))
    for s in samples:
        key = {"model": cfg.model_name, "setting": cfg.setting, "task": s.task, "sid": s.sid}
        todo = [(m, r) for m, r in pairs if not results.done(**key, method=m, ratio=r)]
        if cfg.skip_failing and s.task != "ppl" and _confidently_failing(full.get((s.task, s.length), [])):
            todo = [(m, r) for m, r in todo if m == "full"]
        if progress:
            progress(len(pairs) - len(todo))
        if not todo:
            continue
        e = encode(tok, s, cfg.suite.question_in_context)
        n = len(e.context)
        press = KVPress(model, None, prefill=False, capture_all=True, tokenizer=tok)
        with press:
            t0 = time.perf_counter()
            model(torch.tensor([e.context]), past_key_values=press.new_cache())
            prefill_s = time.perf_counter() - t0
            full_bytes = _full_bytes(press, cfg.kv_dtype)
            for m, r in todo:
                method = built[(m, r)]
                try:
                    if (m, r) not in warm:  # the first call of a method pays one-off costs; time the steady state
                        press.compressed_copy(method, dtype=cfg.kv_dtype)
                        warm.add((m, r))
                    t1 = time.perf_counter()
                    cache, out = press.compressed_copy(method, dtype=cfg.kv_dtype)
                    compress_s = time.perf_counter() - t1 - press.last_shared_fresh_s + press.last_shared_s
                    kv = sum(c.nbytes for c in out) + _sliding_bytes(cache, press.full_layers, cfg.kv_dtype)
                    t2 = time.perf_counter()
                    sc = score_answer(model, cache, n, e)
                except Exception as exc:  # one broken method must not stop a sweep: no row, so a rerun retries
                    if m == "full":
                        raise
                    log.error("%s at %s on %s %s failed: %s: %s", m, r, s.task, s.sid, type(exc).__name__, exc)
                    if progress:
                        progress(1)
                    continue
                if m == "full":
                    full.setdefault((s.task, s.length), []).append(sc.exact)
                results.add(
                    {
                        **key,
                        "length": s.length,
                        "method": m,
                        "ratio": r,
                        "spec": method.spec if method is not None else "full",
                        "tokens": n,
                        "logprob": sc.logprob,
                        "exact": sc.exact,
                        "correct": sc.correct,
                        "answer_tokens": sc.scored,
                        "nll": sc.nll,
                        "kv_bytes_per_token": kv / n,
                        "kv_fraction": kv / full_bytes,
                        "prefill_s": prefill_s,
                        "compress_s": compress_s,
                        "score_s": time.perf_counter() - t2,
                    }
                )
                if progress:
                    progress(1)
    return results


def _confidently_failing(exact: Sequence[bool]) -> bool:
    return len(exact) >= 10 and wilson(sum(exact), len(exact))[1] < PASS


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

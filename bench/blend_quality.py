"""Blending quality on the HF path: the RAG workload of kvplug.eval.rag (documents shuffled and mixed between
requests, planted facts, distractors of the same shape), full prefill vs plain concatenation vs every strategy at
several ratios, on SmolLM2-135M (and Gemma-3-270M), float32.

Each document's KV is computed once after the system prompt (as a store would hold it: kvplug's SegmentStore over
a memory store, framed and verified), with Cache-Craft's attention statistics. For every request and setting the
prompt is prefilled by :func:`kvplug.integrations.hf.blend.blend_prefill` and the answer is teacher-forced: exact
match = every content token (digit, "and") is the greedy choice; log-prob = their mean. 95% Wilson intervals for
accuracy, a seeded percentile bootstrap for the log-prob. FLOP fraction = decoder FLOPs (linear layers and attention,
embeddings and LM head excluded) of the blended prefill / those of a full prefill of the same prompt, counted by the
session (integrity probe included). ``prefix-cache`` is the exact-prefix cache on the same request sequence: full
quality by construction, cost = the rows after the longest prefix shared with an earlier request (32-token blocks).
``retained`` = accuracy on the questions the full prefill answers (the full cache's failures never rank methods).

    nice -n 5 .venv/bin/python bench/blend_quality.py --model smollm2 [--n 100] [--configs ...] [--resume]
    nice -n 5 .venv/bin/python bench/blend_quality.py --model gemma3 --n 40
    .venv/bin/python bench/blend_quality.py --report   # tables, CSV and plot from the saved rows

Rows are appended to ``~/.cache/kvplug/blend-bench/<model>.jsonl`` as they come (``--resume`` skips those done);
``--report`` writes docs/results/blend-hf.md, .csv and .png from every model's rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
ROWS = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvplug" / "blend-bench"
DEFAULT_CONFIGS = (
    "full,none,ape,cacheblend@0.05,cacheblend@0.15,cacheblend@0.3,cacheblend@0.5,kvshare@0.15,kvshare@0.3,"
    "epic@16,epic@64,cacheraft@0.15,cacheraft@0.3"
)
RATIO_FIELD = {"cacheblend": "recompute_ratio", "kvshare": "recompute_ratio", "cacheraft": "recompute_ratio",
               "epic": "initial_tokens"}  # fmt: skip
CSV_COLUMNS = ["model", "strategy", "ratio", "n", "accuracy", "ci_low", "ci_high", "logprob", "logprob_ci",
               "flop_fraction", "param", "recompute_fraction", "retained", "retained_n", "fallbacks"]  # fmt: skip


def parse(spec: str) -> tuple[str, str, dict[str, Any]]:
    """``name@value`` -> (label, name, params); the value sets the strategy's ratio (EPIC: its token count)."""
    name, _, val = spec.partition("@")
    params: dict[str, Any] = {}
    if val:
        field = RATIO_FIELD.get(name)
        if field is None:
            raise SystemExit(f"{name} takes no ratio (got {spec!r})")
        params[field] = int(val) if field == "initial_tokens" else float(val)
    return spec, name, params


def run(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvplug.chunks import Namespace
    from kvplug.connectors.disk import DiskStore
    from kvplug.eval import rag
    from kvplug.integrations.hf.blend import blend_prefill, compute_segment
    from kvplug.methods.blend import CacheCraft, SegmentStore, get_strategy, rope_signature
    from kvplug.models import model_dir

    torch.set_num_threads(args.threads)
    path = model_dir(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    cfg = model.config.get_text_config()
    w = rag.make_workload(
        lambda s: tok(s, add_special_tokens=False).input_ids, n_requests=args.n, n_docs=args.docs,
        docs_per_request=args.per_request, doc_tokens=tuple(int(x) for x in args.doc_tokens.split(",")),
        seed=args.seed,
    )  # fmt: skip
    encoded = [rag.encode(tok, w, r) for r in w.requests]
    configs = [parse(s) for s in args.configs.split(",")]
    rows_dir = Path(args.rows_dir)
    rows_dir.mkdir(parents=True, exist_ok=True)
    rows_path = rows_dir / f"{args.model}.jsonl"
    done: set[tuple[str, str]] = set()
    if args.resume and rows_path.exists():
        for line in rows_path.read_text().splitlines():
            r = json.loads(line)
            if r.get("setting") == setting(args):
                done.add((r["config"], r["rid"]))
    elif rows_path.exists() and not args.resume:
        rows_path.unlink()
    ns = Namespace(
        model=f"{args.model}:{path.name}", dtype="float32", num_layers=cfg.num_hidden_layers,
        num_kv_heads=cfg.num_key_value_heads, head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size //
        cfg.num_attention_heads, rope=rope_signature(cfg),
    )  # fmt: skip
    # segments live in a disk store between runs (same namespace and tokens: same key; verified on every read)
    store = SegmentStore(DiskStore(Path(args.rows_dir) / f"segments-{args.model}", max_bytes=8 << 30), ns)
    prefix = encoded[0].prefix
    t0 = time.perf_counter()
    stats = CacheCraft()
    fresh = 0
    for doc in w.pool:
        ids = rag.doc_ids(tok, doc)
        if store.get(ids, prefix) is None:
            store.put(compute_segment(model, ids, prefix=prefix, strategy=stats), prefix)
            fresh += 1
    took = time.perf_counter() - t0
    print(f"{len(w.pool)} segments ({fresh} computed) in {took:.0f}s; load {os.getloadavg()[0]:.1f}", flush=True)
    prompts = [e.ids for e in encoded]
    hits = rag.prefix_hit_tokens(prompts)
    with rows_path.open("a") as out:
        for i, (req, e) in enumerate(zip(w.requests, encoded, strict=True)):
            segs = [store.get(e.ids[s:t], prefix) for s, t in e.spans]
            if any(s is None for s in segs):
                raise SystemExit(f"{req.sid}: a stored segment went missing")
            keys = [store.key(e.ids[s:t], prefix) for s, t in e.spans]
            for label, name, params in configs:
                if (label, req.sid) in done:
                    continue
                strategy = get_strategy(name, **params)
                t1 = time.perf_counter()
                res = blend_prefill(model, e.ids, e.spans, segs, strategy, keys=keys)
                logits = res.score(e.answer)
                lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(e.answer).view(-1, 1)).squeeze(1)
                keep = torch.tensor(e.scored)
                exact = bool((logits.argmax(-1) == torch.tensor(e.answer))[keep].all())
                row = {
                    "setting": setting(args), "model": args.model, "config": label, "strategy": name,
                    "param": next(iter(params.values()), None), "rid": req.sid, "kind": req.kind,
                    "tokens": len(e.ids), "exact": exact, "logprob": float(lp[keep].mean()),
                    "flop_fraction": res.flop_fraction, "recompute_fraction": res.recompute_fraction,
                    "fallback": res.fallback, "refused": res.refused, "seconds": time.perf_counter() - t1,
                }  # fmt: skip
                if name == "full":
                    hit = hits[i]
                    sess = res.session
                    row["prefix_hit"] = hit
                    row["prefix_fraction"] = (sess.full_flops(len(e.ids)) - sess.full_flops(hit)) / res.full_flops
                out.write(json.dumps(row) + "\n")
                out.flush()
            print(f"{req.sid} done ({i + 1}/{len(w.requests)}), {len(e.ids)} tokens, load {os.getloadavg()[0]:.1f}",
                  flush=True)  # fmt: skip


def setting(args: argparse.Namespace) -> str:
    return f"n{args.n}-d{args.docs}-k{args.per_request}-t{args.doc_tokens}-s{args.seed}"


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from kvplug.eval.stats import bootstrap_mean, wilson

    out = []
    models = sorted({r["model"] for r in rows}, key=lambda m: (m != "smollm2", m))
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        full = {r["rid"]: r for r in mine if r["config"] == "full"}
        order: list[str] = []
        for r in mine:
            if r["config"] not in order:
                order.append(r["config"])
        groups = [(c, [r for r in mine if r["config"] == c]) for c in order]
        if full:  # the exact-prefix cache: full prefill quality, its own cost
            same = {"config": "prefix-cache", "strategy": "prefix-cache", "param": None, "recompute_fraction": 1.0}
            pc = [{**r, **same, "flop_fraction": r["prefix_fraction"]} for r in full.values()]
            groups.insert(1, ("prefix-cache", pc))
        for label, rs in groups:
            rids = {r["rid"] for r in rs}
            if full and rids - set(full):
                continue
            n = len(rs)
            k = sum(r["exact"] for r in rs)
            lo, hi = wilson(k, n)
            lps = [r["logprob"] for r in rs]
            blo, bhi = bootstrap_mean(lps)
            ok = [r for r in rs if full.get(r["rid"], {}).get("exact")]
            name = rs[0]["strategy"]
            ratio = rs[0]["param"] if name != "epic" else round(statistics.mean(r["recompute_fraction"] for r in rs), 3)
            if name in ("full", "prefix-cache"):
                ratio = 1.0
            elif name in ("none", "ape"):
                ratio = 0.0
            out.append({
                "model": model, "strategy": name, "ratio": ratio, "n": n, "accuracy": round(k / n, 4),
                "ci_low": round(lo, 4), "ci_high": round(hi, 4), "logprob": round(statistics.mean(lps), 4),
                "logprob_ci": f"[{blo:.3f}, {bhi:.3f}]",
                "flop_fraction": round(statistics.mean(r["flop_fraction"] for r in rs), 4),
                "param": rs[0]["param"],
                "recompute_fraction": round(statistics.mean(r["recompute_fraction"] for r in rs), 4),
                "retained": round(sum(r["exact"] for r in ok) / len(ok), 4) if ok else None, "retained_n": len(ok),
                "fallbacks": sum(1 for r in rs if r.get("fallback")),
                "label": label, "tokens": round(statistics.mean(r["tokens"] for r in rs)),
                "seconds": round(statistics.mean(r["seconds"] for r in rs), 2),
                "kinds": {kd: (sum(r["exact"] for r in rs if r["kind"] == kd), sum(1 for r in rs if r["kind"] == kd))
                          for kd in sorted({r["kind"] for r in rs})},
            })  # fmt: skip
    return out


def report(note: str, rows_dir: Path) -> None:
    rows = []
    for f in sorted(rows_dir.glob("*.jsonl")):
        rows += [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    if not rows:
        raise SystemExit(f"no rows under {rows_dir}: run the benchmark first")
    table = summarize(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with (RESULTS / "blend-hf.csv").open("w") as f:
        f.write(",".join(CSV_COLUMNS) + "\n")
        for t in table:
            f.write(",".join(_csv(t[c]) for c in CSV_COLUMNS) + "\n")
    lines = [
        "# Blending quality on the HF path",
        "",
        "Generated by `bench/blend_quality.py` (its docstring defines every column). RAG workload of "
        "`kvplug/eval/rag.py`: documents of natural prose (Python docs, licence texts) with planted facts "
        '("The secret number of Quenta is 4821.", three per document, all of the same shape), shuffled and mixed '
        "between requests; `single` questions need one document, `double` two. float32, greedy, teacher-forced.",
        "",
        note,
        "",
        "![accuracy vs FLOP fraction](blend-hf.png)",
        "",
    ]
    for model in dict.fromkeys(t["model"] for t in table):
        mt = [t for t in table if t["model"] == model]
        lines += [
            f"## {model}",
            "",
            f"Prompt length {mt[0]['tokens']} tokens on average; n = {mt[0]['n']} questions.",
            "",
        ]
        lines += ["| setting | accuracy % [95% CI] | single | double | retained % (n) | answer log-prob [95% CI] | "
                  "FLOP fraction | recomputed | s/request |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for t in mt:
            kinds = t["kinds"]
            cells = [f"{kinds[k][0]}/{kinds[k][1]}" if k in kinds else "-" for k in ("single", "double")]
            ret = f"{100 * t['retained']:.0f} ({t['retained_n']})" if t["retained"] is not None else "-"
            fb = f" ({t['fallbacks']} fallbacks)" if t["fallbacks"] else ""
            lines.append(
                f"| {t['label']}{fb} | {100 * t['accuracy']:.0f} [{100 * t['ci_low']:.0f}, {100 * t['ci_high']:.0f}] | "
                f"{cells[0]} | {cells[1]} | {ret} | {t['logprob']:.3f} {t['logprob_ci']} | {t['flop_fraction']:.3f} | "
                f"{t['recompute_fraction']:.3f} | {t['seconds']} |"
            )
        lines.append("")
    (RESULTS / "blend-hf.md").write_text("\n".join(lines))
    plot(table)
    print((RESULTS / "blend-hf.md").read_text())


def _csv(v: Any) -> str:
    s = "" if v is None else str(v)
    return f'"{s}"' if "," in s else s


def plot(table: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(t["model"] for t in table))
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mt = [t for t in table if t["model"] == model]
        for name in dict.fromkeys(t["strategy"] for t in mt):
            pts = sorted((t for t in mt if t["strategy"] == name), key=lambda t: t["flop_fraction"])
            x = [t["flop_fraction"] for t in pts]
            y = [100 * t["accuracy"] for t in pts]
            err = [
                [100 * (t["accuracy"] - t["ci_low"]) for t in pts],
                [100 * (t["ci_high"] - t["accuracy"]) for t in pts],
            ]
            ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name, linestyle="-" if len(pts) > 1 else "none")
        ax.set_xlabel("prefill FLOP fraction (blended / full)")
        ax.set_ylabel("answer accuracy % (95% Wilson CI)")
        ax.set_title(f"{model}: accuracy vs prefill FLOPs")
        ax.set_xlim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "blend-hf.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "gemma3"])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--docs", type=int, default=16, help="documents in the pool")
    ap.add_argument("--per-request", type=int, default=4)
    ap.add_argument("--doc-tokens", default="256,320")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--configs", default=DEFAULT_CONFIGS)
    ap.add_argument("--threads", type=int, default=1, help="1 is much faster on a busy machine")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--note", default="")
    ap.add_argument("--rows-dir", default=str(ROWS), help="where the per-request rows go (one JSONL per model)")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.report:
        report(args.note, Path(args.rows_dir))
    else:
        run(args)


if __name__ == "__main__":
    main()

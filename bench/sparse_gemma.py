"""Sparse decode attention on the HF path: Gemma-3-270M (float32; its 3 global layers sparse, its 15 sliding-window
layers unchanged), needle accuracy and log-prob and the perplexity ratio, dense and every setting side by side.

Each prompt is prefilled once (dense, as an engine would); each setting continues from a copy of that cache
inside :class:`kvplug.integrations.hf.sparse.SparseAttention`, which runs the forced answer tokens as decode
steps (one selection per token and layer). Scoring as in bench/sparse_quality.py: the answer is forced, its
content tokens (digits) scored; exact match = every digit is the greedy choice; 95% Wilson intervals.

    nice -n 5 .venv/bin/python bench/sparse_gemma.py [--contexts 2048,4096] [--n 20] [--budgets 256,512,1024]
        [--methods quest,hierarchical,sentencekv] [--ppl-context 4096] [--ppl-n 4] [--ppl-tokens 32]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from sparse_results import update, wilson  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="2048,4096")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--budgets", default="256,512,1024")
    ap.add_argument("--methods", default="quest,hierarchical,sentencekv")
    ap.add_argument("--ppl-context", type=int, default=4096)
    ap.add_argument("--ppl-n", type=int, default=4)
    ap.add_argument("--ppl-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from kvplug.eval import tasks
    from kvplug.integrations.hf.sparse import SparseAttention
    from kvplug.methods import sparse
    from kvplug.models import gemma3_dir

    path = gemma3_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    enc = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    punct = sparse.sentence_end_ids(tok)
    sets: list[tuple[str, sparse.SparseMethod | None]] = [("dense", None)]
    for name in args.methods.split(","):
        for b in [int(x) for x in args.budgets.split(",")]:
            extra = {"punctuation_ids": punct} if name == "sentencekv" else {}
            sets.append((name, sparse.get(name, budget=b, **extra)))
    load = os.getloadavg()[0]

    def run(prompt: list[int], force: list[int]) -> list[list[tuple[float, bool]]]:
        """Per setting, (log-prob, greedy?) of ``force[1:]`` (``force[0]`` comes from the dense prefill)."""
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            model(torch.tensor([prompt]), past_key_values=cache, logits_to_keep=1)
            out = []
            for _, method in sets:
                c = copy.deepcopy(cache)
                if method is None:
                    logits = model(torch.tensor([force[:-1]]), past_key_values=c).logits[0]
                else:
                    with SparseAttention(model, method) as sa:
                        sa.resume(prompt)
                        logits = model(torch.tensor([force[:-1]]), past_key_values=c).logits[0]
                lp = logits.float().log_softmax(-1)
                tgt = torch.tensor(force[1:])
                got = lp[torch.arange(len(tgt)), tgt].tolist()
                out.append(list(zip(got, (lp.argmax(-1) == tgt).tolist(), strict=True)))
            return out

    rows: list[dict[str, Any]] = []
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    for length in [int(c) for c in args.contexts.split(",")]:
        res: list[list[list[tuple[float, bool]]]] = []
        ctx_tokens = []
        for s in tasks.needle(enc, length, args.n):
            ans = enc(s.answer)
            full = enc(s.context + s.question + s.answer)
            assert full[-len(ans) :] == ans
            n_content = sum(1 for t in ans if any(ch.isalnum() for ch in tok.decode([t])))
            prompt = bos + full[: -len(ans)]
            ctx_tokens.append(len(prompt))
            out = run(prompt, ans)
            res.append([r[-n_content:] for r in out])
            print(f"needle {length} {s.sid}: " + " ".join(str(int(all(g for _, g in r))) for r in res[-1]), flush=True)
        dense_em = [all(g for _, g in r[0]) for r in res]
        dense_lp = statistics.mean(statistics.mean(lp for lp, _ in r[0]) for r in res)
        dlo, dhi = wilson(sum(dense_em), len(dense_em))
        for i, (name, m) in enumerate(sets[1:], start=1):
            assert m is not None
            em = [all(g for _, g in r[i]) for r in res]
            lo, hi = wilson(sum(em), len(em))
            rows.append(
                {
                    "model": "Gemma-3-270M",
                    "engine": "hf",
                    "dtype": "float32",
                    "method": name,
                    "budget": m.budget,
                    "context": round(statistics.mean(ctx_tokens)),
                    "needle_acc": sum(em) / len(em),
                    "needle_n": len(em),
                    "needle_lo": lo,
                    "needle_hi": hi,
                    "dense_needle_acc": sum(dense_em) / len(dense_em),
                    "needle_logprob": statistics.mean(statistics.mean(lp for lp, _ in r[i]) for r in res),
                    "dense_needle_logprob": dense_lp,
                    "note": f"dense 95% CI {dlo:.2f}-{dhi:.2f}",
                }
            )
            print(rows[-1], flush=True)
    nll: dict[int, list[float]] = {i: [] for i in range(len(sets))}
    for w in tasks.ppl(enc, tok.decode, args.ppl_context, args.ppl_tokens, args.ppl_n):
        prompt = bos + enc(w.context)
        force = enc(w.answer)[: args.ppl_tokens]
        for i, r in enumerate(run(prompt, force)):
            nll[i] += [-lp for lp, _ in r]
        print(f"ppl {w.sid}: dense nll {statistics.mean(nll[0]):.3f}", flush=True)
    for i, (name, m) in enumerate(sets[1:], start=1):
        assert m is not None
        ratio = math.exp(statistics.mean(nll[i]) - statistics.mean(nll[0]))
        near = [r for r in rows if r["method"] == name and r["budget"] == m.budget]
        row = next((r for r in near if r["context"] >= args.ppl_context - 300), None)
        if row is None:
            row = {"model": "Gemma-3-270M", "engine": "hf", "dtype": "float32", "method": name, "budget": m.budget}
            row["context"] = args.ppl_context
            rows.append(row)
        row["ppl_ratio"] = ratio
        row["ppl_n"] = len(nll[i])
        print(name, m.budget, "ppl ratio", ratio, flush=True)
    for r in rows:
        r["note"] = (str(r.get("note", "")) + f"; load avg {load:.1f}").lstrip("; ")
    if not args.no_write:
        update("gemma", rows)


if __name__ == "__main__":
    main()

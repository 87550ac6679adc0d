"""The kvpress side of the agreement check: run kvpress 0.5.5 presses on given prompts, report what they kept.

Runs in the oracle environment (``scripts/kvpress-env.sh``: kvpress with its own transformers < 5.3), never in
kvplug's; it imports neither kvplug nor anything kvplug-specific. Input: a JSON file naming the model directory,
the cases (token ids: ``context`` is compressed, ``prompt`` + ``answer`` then run teacher-forced, ``scored`` marks
the answer tokens that count) and the presses (class name + keyword arguments). Output: a JSON file with, per
case and press, the kept token positions per layer and KV head (read back from the compressed cache: each kept
key is found among the uncompressed keys; KVzip reports the positions it masks), the pruned key channels for
ThinK, and the teacher-forced score (exact match, correct tokens, mean log-prob), as kvplug's harness scores.

    python bench/kvpress_oracle.py IN.json OUT.json
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import kvpress  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, DynamicCache  # noqa: E402


def plain_completion_dir(model_dir: str) -> str:
    """A copy of the model directory (weights linked) whose tokenizer has no chat template: KVzipPress then
    reconstructs with the plain "\\n" suffix and no chat prefix, as prompts here are plain completion."""
    tmp = Path(tempfile.mkdtemp(prefix="kvpress-oracle-"))
    for f in Path(model_dir).iterdir():
        if f.name == "chat_template.jinja":
            continue
        if f.name == "tokenizer_config.json":
            cfg = json.loads(f.read_text())
            cfg.pop("chat_template", None)
            (tmp / f.name).write_text(json.dumps(cfg))
        else:
            (tmp / f.name).symlink_to(f.resolve())
    return str(tmp)


def score(model: Any, cache: Any, n: int, case: dict[str, Any]) -> dict[str, Any]:
    """Teacher-forced, one token per forward: layers of a compressed cache may hold different lengths (PyramidKV)
    and one mask per forward cannot fit them all, while a single query row needs no mask."""
    ids = case["prompt"] + case["answer"]
    rows = []
    with torch.no_grad():
        for i, t in enumerate(ids):
            out = model(torch.tensor([[t]]), past_key_values=cache, position_ids=torch.tensor([[n + i]]))
            rows.append(out.logits[0, -1].float())
    logits = torch.stack(rows)
    start = len(case["prompt"]) - 1
    pred = logits[start : start + len(case["answer"])]
    target = torch.tensor(case["answer"])
    keep = torch.tensor(case["scored"], dtype=torch.bool)
    lp = torch.log_softmax(pred, -1).gather(1, target.view(-1, 1)).squeeze(1)[keep]
    hit = (pred.argmax(-1) == target)[keep]
    return {"exact": bool(hit.all()), "correct": int(hit.sum()), "scored": int(keep.sum()), "logprob": float(lp.mean())}


def kept_positions(full: Any, cache: Any) -> list[list[list[int]]]:
    """Per layer and KV head, the sorted positions of the uncompressed keys (same model, same attention
    implementation: bit-identical) that the compressed cache holds; a key not found exactly is an error."""
    out = []
    for fl, cl in zip(full.layers, cache.layers, strict=True):
        heads = []
        for h in range(fl.keys.shape[1]):
            index = {fl.keys[0, h, i].numpy().tobytes(): i for i in range(fl.keys.shape[2])}
            pos = []
            for j in range(cl.keys.shape[2]):
                key = cl.keys[0, h, j]
                i = index.get(key.numpy().tobytes())
                if i is None:
                    dist = (fl.keys[0, h] - key).norm(dim=-1)
                    i = int(dist.argmin())
                    if float(dist[i]) > 1e-4 * float(key.norm()):
                        raise RuntimeError(f"a kept key matches no uncompressed key (distance {float(dist[i])})")
                pos.append(i)
            heads.append(sorted(pos))
        out.append(heads)
    return out


def kvzip_kept(model: Any, n: int) -> list[list[list[int]]]:
    out = []
    for layer in model.model.layers:
        att = layer.self_attn
        heads = att.config.num_key_value_heads
        masked: list[set[int]] = [set() for _ in range(heads)]
        idx = getattr(att, "masked_key_indices", None)
        if idx is not None:
            _, h_idx, s_idx = idx
            for h, s in zip(h_idx.tolist(), s_idx.tolist(), strict=True):
                masked[h].add(s)
        out.append([[i for i in range(n) if i not in masked[h]] for h in range(heads)])
    return out


def pruned_channels(cache: Any) -> list[list[list[int]]]:
    return [
        [torch.nonzero((la.keys[0, h] == 0).all(0)).flatten().tolist() for h in range(la.keys.shape[1])]
        for la in cache.layers
    ]


def main(src: str, dst: str) -> None:
    job = json.loads(Path(src).read_text())
    torch.set_num_threads(int(job.get("threads", 2)))
    model_dir = plain_completion_dir(job["model_dir"])
    dtype = getattr(torch, job.get("dtype", "float32"))
    models: dict[str, Any] = {}

    def model_for(impl: str) -> Any:
        if impl not in models:
            models[impl] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=impl).eval()
        return models[impl]

    results = []
    try:
        for case in job["cases"]:
            ctx = torch.tensor([case["context"]])
            n = ctx.shape[1]
            base = model_for("sdpa")
            full = DynamicCache()
            with torch.no_grad():
                base(ctx, past_key_values=full)
            row: dict[str, Any] = {"id": case["id"], "full": score(base, full, n, case), "presses": {}}
            references: dict[str, Any] = {}  # uncompressed keys per attention implementation
            for p in job["presses"]:
                cls = getattr(kvpress, p["press"])
                press = cls(**p["kwargs"])
                impl = "eager" if p["press"] == "ObservedAttentionPress" else "sdpa"
                model = model_for(impl)
                cache = DynamicCache()
                with torch.no_grad(), press(model):
                    model(ctx, past_key_values=cache)
                entry: dict[str, Any] = {}
                if p["press"] == "KVzipPress":
                    entry["kept"] = kvzip_kept(model, n)
                elif p["press"] == "ThinKPress":
                    entry["pruned_channels"] = pruned_channels(cache)
                else:
                    if impl not in references:
                        references[impl] = DynamicCache()
                        with torch.no_grad():
                            model_for(impl)(ctx, past_key_values=references[impl])
                    entry["kept"] = kept_positions(references[impl], cache)
                entry.update(score(model, cache, n, case))
                for layer in model.model.layers:  # KVzip's masks must not leak into the next case
                    layer.self_attn.masked_key_indices = None
                row["presses"][p["label"]] = entry
            results.append(row)
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
    out = {"kvpress": importlib.metadata.version("kvpress")}
    out.update({"transformers": transformers.__version__, "torch": torch.__version__, "cases": results})
    Path(dst).write_text(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

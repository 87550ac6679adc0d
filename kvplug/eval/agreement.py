"""kvpress as an independent oracle: the same prompts through kvplug's methods and kvpress 0.5.5's presses.

kvpress needs transformers < 5.3, so it runs in its own environment (``scripts/kvpress-env.sh`` builds it:
a virtualenv with kvpress and its transformers, reusing this environment's torch) as a subprocess
(``bench/kvpress_oracle.py``). Both sides get the same token ids and the same float32 weights; per method pair
the comparison reports the kept-token overlap per (case, layer, KV head) (Jaccard of the kept position sets;
ThinK: of the kept key channels) and both sides' exact match with Wilson intervals.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvplug.eval.harness import Encoded, parse_method, score_answer
from kvplug.eval.stats import wilson

ROOT = Path(__file__).resolve().parents[2]
ORACLE = ROOT / "bench" / "kvpress_oracle.py"
ENV_SCRIPT = ROOT / "scripts" / "kvpress-env.sh"
KVPRESS_VERSION = "0.5.5"


@dataclass(frozen=True)
class Pair:
    """One kvplug method spec against one kvpress press (``{ratio}`` in kwargs is filled in)."""

    label: str
    spec: str  # kvplug method spec (compression_ratio is added)
    press: str  # kvpress class name
    kwargs: dict[str, Any] = field(default_factory=dict)
    same: bool = True  # the same algorithm with matched settings: should keep the same tokens
    note: str = ""


#: Every method both projects have. ``same=False`` pairs show a difference by design (docs/methods.md).
PAIRS: tuple[Pair, ...] = (
    Pair("snapkv (kvpress settings)", "snapkv?window_size=64&kernel_size=5&pooling=avg", "SnapKVPress",
         {"window_size": 64, "kernel_size": 5}),
    Pair("snapkv (paper defaults)", "snapkv", "SnapKVPress", {}, False,
         "window 32, max-pool 7 (paper's configs) vs kvpress's window 64, avg-pool 5"),
    Pair("pyramidkv (kvpress schedule)", "pyramidkv?window_size=64&kernel_size=5&pooling=avg&schedule=kvpress",
         "PyramidKVPress", {"window_size": 64, "kernel_size": 5}),
    Pair("pyramidkv (official schedule)", "pyramidkv", "PyramidKVPress", {}, False,
         "KVCache-Factory adds the window on top of the pyramid; kvpress puts it inside and falls back to SnapKV"),
    Pair("streamingllm", "streamingllm", "StreamingLLMPress", {"n_sink": 4}),
    Pair("tova", "tova", "TOVAPress", {}),
    Pair("knorm", "knorm", "KnormPress", {}),
    Pair("h2o (normalized, no recent window)", "h2o?recent_ratio=0&normalize=true", "ObservedAttentionPress", {}),
    Pair("h2o (paper)", "h2o", "ObservedAttentionPress", {}, False,
         "plain attention sum + recent half (paper) vs sum / queries seeing the key, no window (kvpress)"),
    Pair("keydiff", "keydiff", "KeyDiffPress", {}),
    Pair("expectedattention", "expectedattention", "ExpectedAttentionPress", {}),
    Pair("kvzip", "kvzip", "KVzipPress", {}),
    Pair("think (no recent window)", "think?recent_size=0", "ThinKPress", {"key_channel_compression_ratio": 0.4},
         True, "ratio-free on kvplug's side: 40% of key channels; overlap of the kept channels"),
    Pair("random", "random", "RandomPress", {"seed": 0}, False, "different generators: ~1/3 overlap expected"),
)  # fmt: skip


def oracle_python() -> Path:
    """The oracle environment's python: ``$KVPLUG_KVPRESS_PYTHON``, else the one ``scripts/kvpress-env.sh``
    made (built on first use, about 30 s from PyPI)."""
    given = os.environ.get("KVPLUG_KVPRESS_PYTHON")
    if given:
        return Path(given)
    venv = Path(os.environ.get("KVPLUG_KVPRESS_VENV", Path.home() / ".cache" / "kvplug" / f"kvpress-{KVPRESS_VERSION}"))
    py = venv / "bin" / "python"
    if not (venv / ".complete").exists():
        env = {**os.environ, "KVPLUG_KVPRESS_VENV": str(venv), "PYTHON": sys.executable}
        subprocess.run(["bash", str(ENV_SCRIPT)], check=True, env=env)
    return py


def make_case(cid: str, e: Encoded) -> dict[str, Any]:
    return {"id": cid, "context": e.context, "prompt": e.prompt, "answer": e.answer, "scored": e.scored}


def run_oracle(
    model_dir: Path, cases: Sequence[dict[str, Any]], pairs: Sequence[Pair], ratio: float, workdir: Path
) -> dict[str, Any]:
    """Run the kvpress side in its environment; returns the oracle's JSON."""
    presses = []
    for p in pairs:
        kwargs = dict(p.kwargs)
        if p.press != "ThinKPress":
            kwargs["compression_ratio"] = ratio
        presses.append({"label": p.label, "press": p.press, "kwargs": kwargs})
    job = {
        "model_dir": str(model_dir),
        "dtype": "float32",
        "threads": torch.get_num_threads(),
        "cases": list(cases),
        "presses": presses,
    }
    workdir.mkdir(parents=True, exist_ok=True)
    src, dst = workdir / "oracle-in.json", workdir / "oracle-out.json"
    src.write_text(json.dumps(job))
    env = {**os.environ, "PYTHONNOUSERSITE": "1"}
    env.pop("PYTHONPATH", None)
    cmd = [str(oracle_python()), str(ORACLE), str(src), str(dst)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"the kvpress oracle failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(dst.read_text())


def kvplug_side(model: Any, tok: Any, cases: Sequence[dict[str, Any]], pairs: Sequence[Pair], ratio: float) -> dict:
    """kvplug's kept positions (or pruned channels) and scores, per case and pair label (float32 KV)."""
    from kvplug.integrations.hf import KVPress

    out: dict[str, dict[str, Any]] = {}
    for case in cases:
        e = Encoded(case["context"], case["prompt"], case["answer"], case["scored"])
        n = len(e.context)
        press = KVPress(model, None, prefill=False, capture_all=True, tokenizer=tok)
        row: dict[str, Any] = {}
        with press, torch.no_grad():
            model(torch.tensor([e.context]), past_key_values=press.new_cache())
            for p in pairs:
                method = parse_method(p.spec, None if p.press == "ThinKPress" else ratio)
                cache, comp = press.compressed_copy(method, dtype=torch.float32)
                entry: dict[str, Any] = {}
                if p.press == "ThinKPress":
                    layers = press.prefill_layers(torch.float32, press.prefilled[0])
                    for la in layers:
                        la.queries = la.queries[:, :, -method.window_size :]
                    entry["pruned_channels"] = [
                        [torch.nonzero(m).flatten().tolist() for m in method.pruned_channels(la)[0]] for la in layers
                    ]
                else:
                    entry["kept"] = [_kept(c) for c in comp]
                sc = score_answer(model, cache, n, e)
                entry.update({"exact": sc.exact, "correct": sc.correct, "scored": sc.scored, "logprob": sc.logprob})
                row[p.label] = entry
        out[case["id"]] = row
    return out


def _kept(c: Any) -> list[list[int]]:
    idx = c.indices[0]
    vis = torch.ones_like(idx, dtype=torch.bool) if c.keep is None else c.keep[0]
    return [sorted(idx[h][vis[h] & (idx[h] >= 0)].tolist()) for h in range(idx.shape[0])]


def jaccard(a: Sequence[int], b: Sequence[int]) -> float:
    sa, sb = set(a), set(b)
    return 1.0 if not sa and not sb else len(sa & sb) / len(sa | sb)


@dataclass
class Agreement:
    label: str
    ratio: float
    n: int
    kept_overlap: float  # mean Jaccard over (case, layer, KV head)
    min_overlap: float  # the worst (case, layer, head)
    kvplug_acc: float
    kvplug_ci: tuple[float, float]
    kvpress_acc: float
    kvpress_ci: tuple[float, float]
    kvplug_logprob: float
    kvpress_logprob: float
    same: bool
    note: str

    @property
    def accuracy_agrees(self) -> bool:
        """Each side's exact match lies inside the other's 95% interval."""
        return (
            self.kvpress_ci[0] <= self.kvplug_acc <= self.kvpress_ci[1]
            and self.kvplug_ci[0] <= self.kvpress_acc <= self.kvplug_ci[1]
        )


def compare(ours: dict, oracle: dict[str, Any], pairs: Sequence[Pair], ratio: float) -> list[Agreement]:
    out = []
    for p in pairs:
        overlaps, a_ex, b_ex, a_lp, b_lp = [], [], [], [], []
        for case in oracle["cases"]:
            a, b = ours[case["id"]][p.label], case["presses"][p.label]
            key = "pruned_channels" if "pruned_channels" in a else "kept"
            if key == "pruned_channels":  # compare what is kept: the complement of the pruned channels
                a_sets = [[sorted(set(range(64)) - set(h)) for h in layer] for layer in a[key]]
                b_sets = [[sorted(set(range(64)) - set(h)) for h in layer] for layer in b[key]]
            else:
                a_sets, b_sets = a[key], b[key]
            for la, lb in zip(a_sets, b_sets, strict=True):
                overlaps += [jaccard(x, y) for x, y in zip(la, lb, strict=True)]
            a_ex.append(a["exact"])
            b_ex.append(b["exact"])
            a_lp.append(a["logprob"])
            b_lp.append(b["logprob"])
        n = len(a_ex)
        out.append(
            Agreement(
                label=p.label,
                ratio=ratio,
                n=n,
                kept_overlap=sum(overlaps) / len(overlaps),
                min_overlap=min(overlaps),
                kvplug_acc=100.0 * sum(a_ex) / n,
                kvplug_ci=tuple(100.0 * x for x in wilson(sum(a_ex), n)),  # type: ignore[arg-type]
                kvpress_acc=100.0 * sum(b_ex) / n,
                kvpress_ci=tuple(100.0 * x for x in wilson(sum(b_ex), n)),  # type: ignore[arg-type]
                kvplug_logprob=sum(a_lp) / n,
                kvpress_logprob=sum(b_lp) / n,
                same=p.same,
                note=p.note,
            )
        )
    return out

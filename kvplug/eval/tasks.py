"""Evaluation tasks generated locally and deterministically (no downloads).

Every sample is ``context`` (the part a method compresses), ``question`` (appended after compression, as in
kvpress's query-agnostic setting: the method does not see the question) and ``answer`` (scored teacher-forced:
mean log-prob of its tokens, and exact match = every answer token is the greedy choice, which is the same as
greedy decoding reproducing the answer).

- ``needle``: RULER-style single needle (a 5-digit pass key) in repetitive filler, at several depths;
- ``multikey``: several key -> number needles, the question asks one of them;
- ``multivalue``: one key with several numbers, the answer lists them all in order;
- ``qa``: short invented documents (so the model cannot know the facts) and a question about one of them;
- ``ppl``: perplexity of the continuation of long English text (Python's own documentation, ``pydoc_data``).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
TASKS = ("needle", "multikey", "multivalue", "qa", "ppl")


@dataclass(frozen=True)
class Sample:
    task: str
    sid: str
    context: str
    question: str
    answer: str


Tokenize = Callable[[str], list[int]]


def _fill(tokenize: Tokenize, n_tokens: int, inserts: list[tuple[float, str]], filler: str = FILLER) -> str:
    """Filler text of about ``n_tokens`` with ``inserts`` (depth in [0, 1], sentence) placed by depth."""
    per = max(len(tokenize(filler)), 1)
    reps = max(n_tokens // per, 1)
    parts = [filler] * reps
    for depth, sentence in sorted(inserts, reverse=True):
        parts.insert(round(depth * reps), sentence + " ")
    return "".join(parts)


def needle(tokenize: Tokenize, length: int, depths: list[float], seed: int = 0) -> list[Sample]:
    rng = random.Random(f"needle-{seed}-{length}")
    out = []
    for d in depths:
        key = str(rng.randint(10000, 99999))
        ctx = _fill(tokenize, length, [(d, f"The pass key is {key}. Remember it. {key} is the pass key.")])
        q = "\nWhat is the pass key? The pass key is"
        out.append(Sample("needle", f"L{length}-d{d:.2f}", ctx, q, f" {key}"))
    return out


_WORDS = ["apple", "river", "candle", "mirror", "forest", "violin", "planet", "window", "garden", "rocket", "silver"]


def multikey(tokenize: Tokenize, length: int, n: int, keys_per: int = 4, seed: int = 0) -> list[Sample]:
    rng = random.Random(f"multikey-{seed}-{length}")
    out = []
    for i in range(n):
        words = rng.sample(_WORDS, keys_per)
        nums = [str(rng.randint(1000, 9999)) for _ in words]
        inserts = [
            ((j + 0.5) / keys_per, f"The special number for {w} is {x}.")
            for j, (w, x) in enumerate(zip(words, nums, strict=True))
        ]
        ctx = _fill(tokenize, length, inserts)
        t = rng.randrange(keys_per)
        q = f"\nWhat is the special number for {words[t]}? The special number for {words[t]} is"
        out.append(Sample("multikey", f"L{length}-{i}", ctx, q, f" {nums[t]}"))
    return out


def multivalue(tokenize: Tokenize, length: int, n: int, values: int = 3, seed: int = 0) -> list[Sample]:
    rng = random.Random(f"multivalue-{seed}-{length}")
    out = []
    for i in range(n):
        w = rng.choice(_WORDS)
        nums = [str(rng.randint(1000, 9999)) for _ in range(values)]
        inserts = [((j + 0.5) / values, f"One of the special numbers for {w} is {x}.") for j, x in enumerate(nums)]
        ctx = _fill(tokenize, length, inserts)
        q = f"\nWhat are all the special numbers for {w}? The special numbers for {w} are"
        out.append(Sample("multivalue", f"L{length}-{i}", ctx, q, " " + ", ".join(nums)))
    return out


_PEOPLE = ["Alara Venn", "Boris Quill", "Cyra Holt", "Dario Fenn", "Elsa Marsh", "Fabian Roe", "Greta Lund"]
_CITIES = ["Quenta", "Morvale", "Tirsk", "Oblen", "Varna Hills", "Sutherby", "Kelmoor", "Draxton"]
_THINGS = ["glass lanterns", "copper bells", "paper kites", "wool blankets", "clay pots", "oak barrels"]


def qa(n: int, docs: int = 6, seed: int = 0) -> list[Sample]:
    """Invented facts in several short documents; one question each."""
    rng = random.Random(f"qa-{seed}")
    out = []
    for i in range(n):
        people = rng.sample(_PEOPLE, min(docs, len(_PEOPLE)))
        cities = rng.sample(_CITIES, len(people))
        things = [rng.choice(_THINGS) for _ in people]
        years = [rng.randint(1801, 1899) for _ in people]
        parts = []
        for j, (p, c, t, y) in enumerate(zip(people, cities, things, years, strict=True)):
            parts.append(
                f"Document {j + 1}: {p} was born in {c} in {y}. As a young adult {p.split()[0]} moved away and "
                f"became known for making {t}. Friends remember long walks, a small workshop and many letters. "
                f"The workshop closed decades later, but the {t} are still kept in a local museum.\n"
            )
        t = rng.randrange(len(people))
        q = f"\nQuestion: In which town was {people[t]} born?\nAnswer: {people[t]} was born in"
        out.append(Sample("qa", f"qa-{i}", "".join(parts), q, f" {cities[t]}"))
    return out


def ppl_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def ppl(tokenize: Tokenize, detokenize: Callable[[list[int]], str], context: int, target: int, n: int) -> list[Sample]:
    """``n`` windows of ``context`` tokens followed by ``target`` tokens to score, spread over the text."""
    ids = tokenize(ppl_text())
    span = context + target
    step = max((len(ids) - span) // max(n, 1), span)
    out = []
    for i in range(n):
        s = i * step
        if s + span > len(ids):
            break
        ctx, tgt = detokenize(ids[s : s + context]), detokenize(ids[s + context : s + span])
        out.append(Sample("ppl", f"ppl-{i}", ctx, "", tgt))
    return out

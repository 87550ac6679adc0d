"""Evaluation tasks generated locally and deterministically (no downloads), scaled to a context length.

Every sample is ``context`` (what a method compresses), ``question`` (the text between the context and the
answer, ending where the answer starts) and ``answer`` (as it follows the question, with its natural leading
space). The harness tokenizes ``question + answer`` in one piece and scores only the answer's *content tokens*
(those holding a letter or digit): a leading space that the tokenizer splits off (SmolLM2 and Gemma-3 both turn
``" 73921"`` into ``" "`` + five digits) is part of the prompt, teacher-forced and never scored, and separators
inside a list (``", "``) are teacher-forced too. Scores: exact match (every content token is the greedy choice),
token accuracy (the fraction that is: per digit for numbers) and the mean log-prob of the content tokens.

- ``needle``: one 5-digit pass key in repetitive filler, at 10 depths (RULER niah_single style);
- ``multikey``: four word -> 4-digit number needles at spread depths, the question asks one of them;
- ``multivalue``: one word with three 4-digit numbers, all asked, in order of appearance;
- ``qa``: four invented biographies (so the model cannot know the facts) in filler; where was one person born;
- ``ppl``: the continuation of English text (Python's own documentation, ``pydoc_data``) after ``length`` tokens.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
TASKS = ("needle", "multikey", "multivalue", "qa", "ppl")
DEPTHS = 10  # needle depths: (i + 0.5) / 10


@dataclass(frozen=True)
class Sample:
    task: str
    sid: str
    length: int  # the context length asked for, in tokens (the real count is in each result row)
    context: str
    question: str
    answer: str


Tokenize = Callable[[str], list[int]]


def _fill(tokenize: Tokenize, n_tokens: int, inserts: list[tuple[float, str]], filler: str = FILLER) -> str:
    """Filler text of about ``n_tokens`` (inserts included) with ``inserts`` (depth in [0, 1], sentence) at their
    depths."""
    per = max(len(tokenize(filler * 2)) - len(tokenize(filler)), 1)  # as repeated, not alone
    extra = sum(len(tokenize(s + " ")) for _, s in inserts)
    reps = max((n_tokens - extra) // per, 1)
    parts = [filler] * reps
    for depth, sentence in sorted(inserts, reverse=True):
        parts.insert(round(depth * reps), sentence + " ")
    return "".join(parts)


def needle(tokenize: Tokenize, length: int, n: int, seed: int = 0) -> list[Sample]:
    rng = random.Random(f"needle-{seed}-{length}")
    out = []
    for i in range(n):
        d = (i % DEPTHS + 0.5) / DEPTHS
        key = str(rng.randint(10000, 99999))
        ctx = _fill(tokenize, length, [(d, f"The pass key is {key}. Remember it. {key} is the pass key.")])
        q = "\nWhat is the pass key? The pass key is"
        out.append(Sample("needle", f"L{length}-{i}-d{d:.2f}", length, ctx, q, f" {key}"))
    return out


_WORDS = [
    "apple", "river", "candle", "mirror", "forest", "violin", "planet", "window", "garden", "rocket", "silver",
    "ladder", "pencil", "island", "basket", "dragon", "marble", "rabbit", "castle", "pepper",
]  # fmt: skip


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
        out.append(Sample("multikey", f"L{length}-{i}", length, ctx, q, f" {nums[t]}"))
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
        out.append(Sample("multivalue", f"L{length}-{i}", length, ctx, q, " " + ", ".join(nums)))
    return out


_FIRST = [
    "Alara", "Boris", "Cyra", "Dario", "Elsa", "Fabian", "Greta", "Hugo", "Ilse", "Jonas", "Katya", "Lorenz",
    "Mira", "Nils", "Olga", "Pavel", "Rosa", "Soren", "Tilda", "Ugo", "Vera", "Wim", "Xenia", "Yuri",
]  # fmt: skip
_LAST = [
    "Venn", "Quill", "Holt", "Fenn", "Marsh", "Roe", "Lund", "Brask", "Corr", "Dahl", "Esk", "Farrow", "Gile",
    "Hask", "Ibb", "Jarl", "Kemp", "Lisk", "Morrow", "Nash", "Orme", "Pike", "Rusk", "Sapp",
]  # fmt: skip
_SYL_A = ["Quen", "Mor", "Tir", "Ob", "Var", "Suth", "Kel", "Drax", "Bel", "Cor", "Fal", "Gan", "Hol", "Lun"]
_SYL_B = ["ta", "vale", "sk", "len", "na", "erby", "moor", "ton", "wick", "ford", "mere", "holm", "dane", "ley"]
_THINGS = ["glass lanterns", "copper bells", "paper kites", "wool blankets", "clay pots", "oak barrels"]


def _doc(j: int, person: str, city: str, thing: str, year: int) -> str:
    first = person.split()[0]
    return (
        f"Document {j + 1}: {person} was born in {city} in {year}. As a young adult {first} moved away and "
        f"became known for making {thing}. Friends remember long walks, a small workshop and many letters. "
        f"The workshop closed decades later, but the {thing} are still kept in a local museum.\n"
    )


def qa(tokenize: Tokenize, length: int, n: int, docs: int = 4, seed: int = 0) -> list[Sample]:
    """``docs`` invented biographies (first names, surnames and the towns' first syllables all distinct within a
    sample, so one name never points two ways) spread through filler of about ``length`` tokens; the question
    asks one person's birthplace."""
    rng = random.Random(f"qa-{seed}-{length}")
    out = []
    for i in range(n):
        people = [f"{a} {b}" for a, b in zip(rng.sample(_FIRST, docs), rng.sample(_LAST, docs), strict=True)]
        cities = [a + rng.choice(_SYL_B) for a in rng.sample(_SYL_A, docs)]
        inserts = [
            ((j + 0.5) / docs, _doc(j, p, c, rng.choice(_THINGS), rng.randint(1801, 1899)).strip())
            for j, (p, c) in enumerate(zip(people, cities, strict=True))
        ]
        t = rng.randrange(docs)
        q = f"\nQuestion: In which town was {people[t]} born?\nAnswer: {people[t]} was born in"
        out.append(Sample("qa", f"L{length}-{i}", length, _fill(tokenize, length, inserts), q, f" {cities[t]}"))
    return out


def ppl_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def ppl(tokenize: Tokenize, detokenize: Callable[[list[int]], str], length: int, target: int, n: int) -> list[Sample]:
    """``n`` windows of ``length`` context tokens followed by ``target`` tokens to score, spread over the text
    (windows overlap when the text is too short for ``n`` disjoint ones)."""
    ids = tokenize(ppl_text())
    span = length + target
    if span > len(ids):
        raise ValueError(f"ppl: the text has {len(ids)} tokens, fewer than {span}")
    step = (len(ids) - span) // max(n - 1, 1)
    out = []
    for i in range(n):
        s = i * step
        ctx, tgt = detokenize(ids[s : s + length]), detokenize(ids[s + length : s + span])
        out.append(Sample("ppl", f"L{length}-{i}", length, ctx, "", tgt))
    return out

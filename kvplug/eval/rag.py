"""A RAG workload generated locally and deterministically (no downloads): documents of natural English prose with
planted facts, requests that bring 4-8 of them back shuffled and mixed, and questions that need one or two of them.

- Prose: sentences of Python's own documentation (``pydoc_data.topics``, code blocks dropped) and Debian's licence
  texts (``/usr/share/common-licenses``, when present), each document a run of consecutive sentences of one source;
- facts: every document holds ``facts_per_doc`` facts of one shape, ``"The secret number of Quenta is 4821."``,
  at spread depths, with names unique across the pool: whichever fact a question asks, the others in its document
  and in every other document are distractors of the same shape;
- requests: ``docs_per_request`` documents drawn from the pool and shuffled, so the same document comes back at
  other positions, after other documents (what blending must handle and prefix caching cannot);
- questions: ``single`` (one fact, one document) or ``double`` (two facts from two documents, answered as
  ``" 4821 and 7390"``), asked as a plain completion (``"Answer: The secret number of Quenta is"``), which suits
  small models better than a chat template.

A request is token pieces, not one string: the system prompt, each document, the separators and the question are
tokenized on their own and concatenated, so a document's tokens are identical wherever it appears (its stored KV
can be found by its tokens) and the segment spans are exact.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

Tokenize = Callable[[str], list[int]]

SYSTEM = "Below are some documents. Read them and answer the question at the end.\n\n"
SEPARATOR = "\n\n"
LICENCES = Path("/usr/share/common-licenses")
_LICENCE_FILES = ("GPL-3", "Apache-2.0", "MPL-2.0", "GFDL-1.3", "LGPL-3", "Artistic", "CC0-1.0")

_SYL_A = ["Quen", "Mor", "Tir", "Ob", "Var", "Suth", "Kel", "Drax", "Bel", "Cor", "Fal", "Gan", "Hol", "Lun", "Pel"]
_SYL_B = ["ta", "vale", "isk", "len", "nar", "erby", "moor", "ton", "wick", "ford", "mere", "holm", "dane", "ley"]


def _prose(text: str) -> list[str]:
    """Sentences of the prose paragraphs of ``text`` (indented blocks, headings and grammar rules dropped)."""
    out: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        lines = para.split("\n")
        if any(ln.startswith("   ") or ln.startswith("\t") for ln in lines):
            continue
        joined = " ".join(ln.strip() for ln in lines).strip()
        if len(joined) < 80 or "::=" in joined or joined.count('"') > 6 or set(joined) <= set("*=-~ "):
            continue
        letters = sum(c.isalpha() or c == " " for c in joined) / len(joined)
        if letters < 0.85:
            continue
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", joined):
            s = s.strip()
            if 25 <= len(s) <= 320 and s[-1] in ".!?":
                out.append(s)
    return out


def sources() -> list[tuple[str, list[str]]]:
    """(name, sentences) of every prose source available offline, in a fixed order."""
    from pydoc_data.topics import topics

    out = []
    for name in _LICENCE_FILES:
        path = LICENCES / name
        if path.exists():
            sents = _prose(path.read_text(errors="replace"))
            if len(sents) >= 20:
                out.append((name, sents))
    pydoc = [s for k in sorted(topics) for s in _prose(topics[k])]
    out.append(("pydoc", pydoc))
    return out


@dataclass(frozen=True)
class Fact:
    name: str
    number: str

    @property
    def sentence(self) -> str:
        return f"The secret number of {self.name} is {self.number}."


@dataclass(frozen=True)
class Document:
    index: int
    source: str
    text: str  # ends with a full stop; separators go between documents
    facts: tuple[Fact, ...]


@dataclass(frozen=True)
class Request:
    sid: str
    kind: str  # "single" or "double"
    docs: tuple[int, ...]  # pool indices in prompt order
    question: str  # ends where the answer starts
    answer: str  # with its leading space
    needs: tuple[int, ...]  # the documents holding the asked facts


@dataclass(frozen=True)
class Workload:
    system: str
    separator: str
    pool: tuple[Document, ...]
    requests: tuple[Request, ...]


def names(n: int, rng: random.Random) -> list[str]:
    every = [a + b for a in _SYL_A for b in _SYL_B]
    if n > len(every):
        raise ValueError(f"at most {len(every)} unique names, asked for {n}")
    return rng.sample(every, n)


def make_pool(
    tokenize: Tokenize, n_docs: int, doc_tokens: tuple[int, int], facts_per_doc: int, seed: int
) -> list[Document]:
    """``n_docs`` documents of ``doc_tokens`` (min, max) tokens each, with planted facts."""
    rng = random.Random(f"rag-pool-{seed}")
    srcs = sources()
    fact_names = names(n_docs * facts_per_doc, rng)
    numbers: set[str] = set()
    docs = []
    for i in range(n_docs):
        src, sents = srcs[i % len(srcs)]
        target = rng.randint(*doc_tokens)
        facts = []
        for j in range(facts_per_doc):
            num = str(rng.randint(1000, 9999))
            while num in numbers:
                num = str(rng.randint(1000, 9999))
            numbers.add(num)
            facts.append(Fact(fact_names[i * facts_per_doc + j], num))
        budget = target - sum(len(tokenize(" " + f.sentence)) for f in facts)
        start = rng.randrange(len(sents))
        body: list[str] = []
        used = 0
        k = start
        while used < budget:  # whole sentences until the target is reached
            s = sents[k % len(sents)]
            body.append(s)
            used += len(tokenize(" " + s))
            k += 1
        slots = sorted(rng.sample(range(1, len(body) + 1), min(facts_per_doc, len(body)))) if body else [0]
        for f, at in zip(reversed(facts), reversed(slots), strict=False):
            body.insert(at, f.sentence)
        docs.append(Document(i, src, " ".join(body), tuple(facts)))
    return docs


def make_workload(
    tokenize: Tokenize,
    n_requests: int = 100,
    n_docs: int = 16,
    docs_per_request: int = 4,
    doc_tokens: tuple[int, int] = (256, 320),
    facts_per_doc: int = 3,
    double_share: float = 0.25,
    seed: int = 0,
) -> Workload:
    """The workload (see the module docstring). Deterministic for a seed and a tokenizer."""
    if not 1 <= docs_per_request <= n_docs:
        raise ValueError(f"docs_per_request must be in [1, {n_docs}], got {docs_per_request}")
    if docs_per_request < 2 and double_share > 0:
        raise ValueError("double questions need at least two documents per request")
    pool = make_pool(tokenize, n_docs, doc_tokens, facts_per_doc, seed)
    rng = random.Random(f"rag-requests-{seed}")
    reqs = []
    for r in range(n_requests):
        chosen = rng.sample(range(n_docs), docs_per_request)  # also the prompt order: shuffled
        double = rng.random() < double_share
        if double:
            a, b = rng.sample(chosen, 2)
            fa, fb = rng.choice(pool[a].facts), rng.choice(pool[b].facts)
            q = (
                f"Question: What are the secret numbers of {fa.name} and {fb.name}?\n"
                f"Answer: The secret numbers of {fa.name} and {fb.name} are"
            )
            reqs.append(Request(f"r{r}", "double", tuple(chosen), q, f" {fa.number} and {fb.number}", (a, b)))
        else:
            a = rng.choice(chosen)
            f = rng.choice(pool[a].facts)
            q = f"Question: What is the secret number of {f.name}?\nAnswer: The secret number of {f.name} is"
            reqs.append(Request(f"r{r}", "single", tuple(chosen), q, f" {f.number}", (a,)))
    return Workload(SYSTEM, SEPARATOR, tuple(pool), tuple(reqs))


@dataclass(frozen=True)
class Encoded:
    """A request as token ids: ``ids`` is the prompt (ending where the answer starts), ``spans`` the documents'
    token ranges in it, ``answer`` the answer tokens and ``scored`` which of them count (those with a letter or
    digit: a leading space the tokenizer splits off is teacher-forced, never scored)."""

    ids: list[int]
    spans: list[tuple[int, int]]
    docs: list[int]
    answer: list[int]
    scored: list[bool]
    prefix: list[int]  # the system prompt's tokens (what the documents' KV is computed after)


def encode(tok: object, w: Workload, req: Request) -> Encoded:
    """Tokenize a request piece by piece with a transformers tokenizer (see :class:`Encoded`)."""

    def ids(text: str, special: bool = False) -> list[int]:
        return tok(text, add_special_tokens=special).input_ids  # type: ignore[operator]

    prefix = ids(w.system, special=True)
    out = list(prefix)
    spans = []
    sep = ids(w.separator)
    for n, d in enumerate(req.docs):
        if n:
            out += sep
        doc = doc_ids(tok, w.pool[d])
        spans.append((len(out), len(out) + len(doc)))
        out += doc
    out += sep
    enc = tok(req.question + req.answer, add_special_tokens=False, return_offsets_mapping=True)  # type: ignore[operator]
    qa, offsets = enc.input_ids, enc.offset_mapping
    start = len(req.question) + len(req.answer) - len(req.answer.lstrip())
    a0 = next((i for i, (_, e) in enumerate(offsets) if e > start), None)
    if not a0:
        raise ValueError(f"{req.sid}: cannot split the question from the answer")
    text = req.question + req.answer
    scored = [any(c.isalnum() for c in text[max(b, start) : e]) for b, e in offsets[a0:]]
    return Encoded(out + qa[:a0], spans, list(req.docs), qa[a0:], scored, prefix)


def doc_ids(tok: object, doc: Document) -> list[int]:
    """A document's tokens (the same in every request)."""
    return tok(doc.text, add_special_tokens=False).input_ids  # type: ignore[operator]


def prefix_hit_tokens(prompts: Sequence[Sequence[int]], block: int = 32) -> list[int]:
    """For each prompt in order, the tokens an exact-prefix cache (vLLM's, ``block``-token blocks) would hold from
    the earlier prompts: the longest common prefix with any of them, rounded down to whole blocks, at least one
    token left to compute."""
    out = []
    seen: list[Sequence[int]] = []
    for p in prompts:
        best = 0
        for q in seen:
            n = 0
            for x, y in zip(p, q, strict=False):
                if x != y:
                    break
                n += 1
            best = max(best, n)
        hit = min(best, len(p) - 1) // block * block
        out.append(hit)
        seen.append(p)
    return out

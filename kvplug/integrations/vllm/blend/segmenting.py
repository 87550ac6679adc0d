"""Where the reusable segments (documents) of a prompt are, from its token ids alone (no vLLM imports).

Three sources, in the order the connector tries them:

* explicit: ``kv_transfer_params = {"blend": {"segments": [[start, end], ...]}}`` (token index ranges);
* a separator: ``blend_separator`` (a string, e.g. ``" # # "``) tokenized once; the prompt reads
  ``prefix SEP doc_1 SEP doc_2 ... SEP question``: the documents are the spans between separators (the prefix
  before the first one and the question after the last one are computed fresh);
* chat messages: ``blend_messages: true``: each message's content, except the last message (the question), is a
  segment; message boundaries come from the chat template's own special tokens (found by rendering the template).

Segments shorter than ``min_tokens`` are computed fresh (too short to be worth a lookup).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvplug.errors import ConfigError

Span = tuple[int, int]


def explicit_segments(value: Any, num_tokens: int) -> list[Span]:
    """Validate ``[[start, end], ...]``: sorted, non-overlapping, inside the prompt; a clear error otherwise."""
    if not isinstance(value, list | tuple):
        raise ConfigError("blend.segments must be a list of [start, end] token ranges")
    out: list[Span] = []
    for item in value:
        if not (isinstance(item, list | tuple) and len(item) == 2 and all(isinstance(x, int) for x in item)):
            raise ConfigError(f"blend.segments: {item!r} is not a [start, end] pair of integers")
        s, e = int(item[0]), int(item[1])
        if not 0 <= s < e <= num_tokens:
            raise ConfigError(f"blend.segments: [{s}, {e}] is outside the {num_tokens}-token prompt")
        if out and s < out[-1][1]:
            raise ConfigError(f"blend.segments: [{s}, {e}] overlaps or precedes the previous segment")
        out.append((s, e))
    return out


def find_all(tokens: Sequence[int], pattern: Sequence[int]) -> list[int]:
    """Start indices of every non-overlapping occurrence of ``pattern`` in ``tokens``."""
    n, m = len(tokens), len(pattern)
    if not m:
        return []
    out, i, first = [], 0, pattern[0]
    toks = list(tokens)
    pat = list(pattern)
    while i <= n - m:
        if toks[i] == first and toks[i : i + m] == pat:
            out.append(i)
            i += m
        else:
            i += 1
    return out


def separator_segments(tokens: Sequence[int], separator: Sequence[int]) -> list[Span]:
    """The spans between consecutive separators (documents); none without at least two separators."""
    starts = find_all(tokens, separator)
    m = len(separator)
    return [(a + m, b) for a, b in zip(starts, starts[1:], strict=False) if b > a + m]


class MessageMarkers:
    """The special tokens a chat template puts around each message: ``start`` opens a message header (the role
    follows, up to a token whose text ends a line), ``end`` closes the content."""

    def __init__(self, start: int, end: int, decode: Any) -> None:
        self.start, self.end = start, end
        self._decode = decode
        self._newline: dict[int, bool] = {}

    def ends_line(self, token: int) -> bool:
        if token not in self._newline:
            self._newline[token] = "\n" in self._decode([token])
        return self._newline[token]

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> MessageMarkers:
        """Render the tokenizer's chat template around two sentinel contents and read the markers off it."""
        msgs = [{"role": "user", "content": "kvplugA"}, {"role": "user", "content": "kvplugB"}]
        rendered = tokenizer.apply_chat_template(msgs, tokenize=True)
        ids = list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        a = tokenizer("kvplugA", add_special_tokens=False).input_ids
        b = tokenizer("kvplugB", add_special_tokens=False).input_ids
        ia, ib = find_all(ids, a), find_all(ids, b)
        if not ia or not ib:
            raise ConfigError("blend_messages: cannot locate message contents in this model's chat template")
        between = [t for t in ids[ia[0] + len(a) : ib[0]] if t in special]
        if len(between) < 2:
            raise ConfigError("blend_messages: the chat template has no special tokens around messages")
        return cls(start=between[-1], end=between[0], decode=tokenizer.decode)


def message_segments(tokens: Sequence[int], markers: MessageMarkers) -> list[Span]:
    """Content spans of every message but the last (the question)."""
    toks = list(tokens)
    spans: list[Span] = []
    i = 0
    while i < len(toks):
        if toks[i] != markers.start:
            i += 1
            continue
        j = i + 1
        while j < len(toks) and not markers.ends_line(toks[j]) and toks[j] != markers.end:
            j += 1  # the role and header
        content = j + 1
        try:
            end = toks.index(markers.end, content)
        except ValueError:
            break  # an open message: the generation prompt
        if end > content:
            spans.append((content, end))
        i = end + 1
    return spans[:-1]


def keep_long(spans: Sequence[Span], min_tokens: int) -> list[Span]:
    return [(s, e) for s, e in spans if e - s >= min_tokens]

"""Verification of a semantic hit: the features that flip an answer while keeping embeddings close must match.

Similarity alone cannot tell "integer to string" from "string to integer" (0.996 with MiniLM) or "capital of
Niger" from "capital of Nigeria". Before a hit is served, the cached question and the new one are compared on five
lexical features, each a *check* that a policy category turns on or off (``verify`` in the policy):

- ``numbers``: the sets of numbers must be equal. Digit runs anywhere ("LH400" -> 400, "401(k)" -> 401, "3.12",
  "1,000" -> 1000, "59½" and "59 and a half" -> 59.5), number words ("three" -> 3, "first" -> 1) and Roman
  numerals II-XX;
- ``time``: the sets of dates and relative time words must be equal: today / now / currently / latest are one
  class ("now", compatible with no time word at all), tonight, yesterday (and last night), tomorrow,
  this/next/last week|weekend|month|year, weekdays and months are others;
- ``entities``: named entities (capitalised words not starting a sentence, mixed-case, all-caps, letter+digit or
  ``C++``-like identifiers, known programming languages, tools, units and currencies, and words the embedder's
  vocabulary does not hold as one token when a vocabulary is given: "ibuprofen", "paracetamol"). A hit is refused
  when *each* question has an entity the other lacks (a substitution: Niger vs Nigeria); one question adding a
  qualifier the other lacks is not refused;
- ``negation``: both questions negated or neither (not, no, never, without, n't...);
- ``direction``: for a conversion or a move ("A to B", "from A to B", "A into B", "how many A in B"), no term may
  sit on the source side of one question and the target side of the other;
- ``opposites``: words of opposite or mutually exclusive meaning (more/less, first/last, open/closed, add/remove,
  read/write, buy/sell, local/remote, adult/child, spring/autumn, morning/evening...): both questions must use the
  same sides of each such group (a question using none of a group is not compared on it).

No paper defines this step: the category-aware cache (Wang et al., arXiv 2510.26835) relies on thresholds alone,
and vCache (arXiv 2502.03771) shows that a static threshold gives no error guarantee. It costs tens of
microseconds per candidate (features are computed once per question, on a bounded prefix of ``max_chars``).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass

CHECKS = ("numbers", "time", "entities", "negation", "direction", "opposites")

_TOKEN_RE = re.compile(r"[A-Za-z0-9_][\w'+#&.\-]*[\w+#]|[A-Za-z0-9_]")
_SENTENCE_END = set(".!?:;\"'(“‘\n")

_NUMBER_WORDS = {
    "zero": "0", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8",
    "nine": "9", "ten": "10", "eleven": "11", "twelve": "12", "thirteen": "13", "fourteen": "14",
    "fifteen": "15", "sixteen": "16", "seventeen": "17", "eighteen": "18", "nineteen": "19", "twenty": "20",
    "thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70", "eighty": "80", "ninety": "90",
    "hundred": "100", "thousand": "1000", "million": "1000000", "billion": "1000000000", "dozen": "12",
    "first": "1", "second": "2", "third": "3", "fourth": "4", "fifth": "5", "sixth": "6", "seventh": "7",
    "eighth": "8", "ninth": "9", "tenth": "10", "twice": "2",
}  # fmt: skip
_ROMAN = {
    "ii": "2", "iii": "3", "iv": "4", "vi": "6", "vii": "7", "viii": "8", "ix": "9", "xi": "11", "xii": "12",
    "xiii": "13", "xiv": "14", "xv": "15", "xvi": "16", "xvii": "17", "xviii": "18", "xix": "19", "xx": "20",
}  # fmt: skip
_NUM_RE = re.compile(r"\d+(?:[.,]\d+)*")
_HALF_RE = re.compile(r"(\d+)\s*(?:½|and a half)")

_NOW = r"right now|currently|current|at the moment|at present|presently|nowadays|these days|now|today|latest|live"
_TIME_RULES: list[tuple[re.Pattern[str], str | None]] = [
    (re.compile(r"\b(yesterday|last night)\b"), "yesterday"),
    (re.compile(r"\b(tomorrow)\b"), "tomorrow"),
    (re.compile(r"\b(tonight|this evening)\b"), "tonight"),
    (re.compile(r"\b(this|next|last|previous|coming) (week|weekend|month|year|season|quarter)\b"), None),
    (re.compile(r"\b(this morning|this afternoon|" + _NOW + r")\b"), "now"),
    (re.compile(r"\b(monday|tuesday|wednesday|thursday|friday|saturday|sunday)s?\b"), None),
]
_MONTH_RE = re.compile(r"\b(January|February|March|April|May|June|July|August|September|October|November|December)\b")

_NEGATION_RE = re.compile(
    r"\b(not|no|never|none|nobody|nothing|nowhere|neither|nor|without|cannot)\b|n't\b", re.IGNORECASE
)

# lower-case words that name something specific (so "in python" and "in rust" differ): languages, tools, units,
# currencies. Capitalised and mixed-case names need no list.
_TERMS = frozenset(
    """python java javascript typescript golang rust ruby php perl swift kotlin scala haskell elixir erlang clojure
    lua julia matlab fortran cobol dart bash zsh powershell sql mysql postgres postgresql sqlite mongodb redis
    html css json yaml xml csv toml markdown git github gitlab docker kubernetes k8s helm terraform ansible npm
    yarn pip conda poetry maven gradle cargo linux ubuntu debian windows macos ios android react vue angular svelte
    django flask fastapi rails spring laravel node nodejs deno numpy pandas pytorch tensorflow excel vim emacs
    celsius fahrenheit kelvin miles mile km kilometers kilometres meters metres feet foot inches inch yards pounds
    kg kilograms grams ounces oz liters litres gallons cups cup tablespoons tablespoon tbsp teaspoons teaspoon tsp
    dollars dollar euros euro yen yuan rupees pesos francs bitcoin ethereum usd eur gbp jpy cny inr chf""".split()
)
# capitalised words that do not name anything when they start a sentence (question words, verbs of requests...)
_COMMON = frozenset(
    """a an the i i'm i've i'd i'll me my we our you your it its is are was were be been am do does did done can
    could would should will shall may might must have has had what what's whats which who whom whose when where
    why how how's if is isn't are aren't does doesn't do don't can can't please tell show give explain write list
    make find describe compare convert translate suggest recommend help let create name get go say any some
    there here this that these those in on at for from to of by with about as and or but so not no yes hi hey
    hello thanks thank okay ok sure quick best good great new old fun funny feeling much many more most
    each every all another other such just also still again ever never always often sometimes maybe perhaps
    one two three four five six seven eight nine ten first last next previous current today tomorrow yesterday
    now then after before during while since until step steps way ways tips tip idea ideas advice option
    options meaning difference distance number price time cost rate score status weather news top
    average normal safe early late long short high low big small large little fast slow easy hard simple
    should'nt calculate give me send use using set start stop run build install remove delete add change fix
    check turn keep put take bring pack plan cook play read learn teach start try need want like love know think
    see look feel mean cause causes symptoms side effects signs benefits risks rules meaning definition""".split()
)
_CAPITAL_STOP = frozenset({"i", "i'm", "i've", "i'd", "i'll", "ok", "okay", "the", "a", "an"})

_ARTICLES = frozenset(
    """a an the my your our their his her its this that these those some any one of i you we they do does did can
    could how what is are should would will way best please""".split()
)
_SIDE_END = frozenset("in on at for with using by via per when if so and or but than".split())
_CUES_RE = re.compile(
    r"\b(convert\w*|conversion|turn|turning|transform\w*|cast\w*|change|changing|translat\w*|exchange|rate|"
    r"switch\w*|migrat\w*|transfer\w*|move|moving|get|go|travel\w*|fly|flight|drive|refinanc\w*|from)\b"
)
_NOT_BEFORE_TO = frozenset(
    """how want wants wanted need needs needed way ways going have has had able used like due according try
    trying tried order is are was were be want plan planning supposed about ought something anything what
    where when easy hard best better good time""".split()
)
_HOW_MANY_RE = re.compile(
    r"\bhow many (\w+(?: \w+)?) (?:are|is|make|makes|equals?|in)(?: there)?(?: in)? ((?:\S+ ){0,3}\S+)"
)


# groups of words with opposite or mutually exclusive meanings; each group is a list of sides (word stems)
_OPPOSITE_GROUPS: list[list[frozenset[str]]] = [
    [frozenset(a.split()), frozenset(b.split())]
    for a, b in (
        ("increase raise rise boost improve higher more most maximum max", "decrease lower reduce drop less least "
         "fewer minimum min worsen"),
        ("high", "low"),
        ("first earliest begin beginning start", "last final end ending finish"),
        ("largest biggest tallest longest greatest widest deepest heaviest highest", "smallest shortest lowest "
         "narrowest shallowest lightest tiniest"),
        ("closest nearest", "farthest furthest"),
        ("open opened opening", "close closed closing shut"),
        ("enable enabled", "disable disabled"),
        ("accept accepted allow allowed approve", "decline declined reject rejected deny denied refuse"),
        ("add added insert install", "remove removed delete deleted uninstall"),
        ("read load", "write save"),
        ("upload push import", "download pull export"),
        ("encode encrypt compress zip", "decode decrypt decompress unzip"),
        ("buy buying purchase", "sell selling"),
        ("borrow", "lend"),
        ("deposit", "withdraw withdrawal"),
        ("send sent", "receive received"),
        ("before", "after"),
        ("local", "remote"),
        ("public", "private"),
        ("internal", "external"),
        ("input", "output"),
        ("ascending", "descending"),
        ("uppercase", "lowercase"),
        ("positive", "negative"),
        ("win won", "lose lost"),
        ("pro pros advantage advantages", "con cons disadvantage disadvantages"),
        ("profit gain gains", "loss losses"),
        ("hot warm heat", "cold cool ice"),
        ("fast faster fastest", "slow slower slowest"),
        ("cheap cheaper cheapest", "expensive"),
        ("hard harder hardest", "soft softer softest"),
        ("wet", "dry"),
        ("safe safer", "dangerous unsafe"),
        ("legal", "illegal"),
        ("healthy", "unhealthy"),
        ("best better", "worst worse"),
        ("born birth", "die died death"),
        ("arrive arrival", "depart departure leave"),
        ("always", "never"),
        ("simple", "compound"),
        ("male men man boy boys", "female women woman girl girls"),
    )
] + [
    [frozenset(w.split()) for w in group]
    for group in (
        ("spring", "summer", "autumn", "winter"),
        ("morning", "afternoon", "evening", "night"),
        ("north northern", "south southern", "east eastern", "west western"),
        ("adult adults grown-up", "child children kid kids toddler baby newborn", "teen teenager teenagers",
         "elderly senior seniors"),
        ("rent renting", "lease leasing", "buy buying"),
    )
]  # fmt: skip
# common abbreviations and their long forms: a question using one matches an entity written the other way
_ALIASES = {
    "js": "javascript", "ts": "typescript", "py": "python", "golang": "go", "k8": "kubernetes",
    "k8s": "kubernetes", "postgre": "postgresql", "postgres": "postgresql", "dict": "dictionary",
    "us": "united states", "usa": "united states", "u.s": "united states", "america": "united states",
    "uk": "united kingdom", "britain": "united kingdom", "usd": "dollar", "eur": "euro", "gbp": "pound",
    "jpy": "yen", "ww1": "world war i", "wwi": "world war i", "ww2": "world war ii", "wwii": "world war ii",
    "tbsp": "tablespoon", "tsp": "teaspoon", "km": "kilometer", "kilometre": "kilometer", "metre": "meter",
    "litre": "liter", "nyc": "new york", "la": "los angeles",
}  # fmt: skip
_STEM_SUFFIXES = ("ing", "ed", "es", "s", "er")


def _stem(word: str) -> str:
    for suf in _STEM_SUFFIXES:
        if len(word) > len(suf) + 2 and word.endswith(suf):
            word = word[: -len(suf)]
            break
    return word.rstrip("e") if len(word) > 3 else word


_OPPOSITES = [[frozenset(_stem(w) for w in side) for side in group] for group in _OPPOSITE_GROUPS]


def _norm(word: str) -> str:
    w = word.lower().replace("’", "'")
    if w.endswith("'s"):
        w = w[:-2]
    elif w.endswith("s'"):
        w = w[:-1]
    w = w.strip("'.-")
    if len(w) > 3 and w.endswith("es") and w[-3] in "sxz":
        w = w[:-2]
    elif len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
        w = w[:-1]
    return w


def _same(a: str, b: str) -> bool:
    """Equal words, or an abbreviation and its word ("int"/"integer", "str"/"string")."""
    if a == b:
        return True
    short, long_ = (a, b) if len(a) <= len(b) else (b, a)
    return len(short) >= 3 and long_.startswith(short) and not short.isdigit()


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


@dataclass(frozen=True)
class QueryFeatures:
    """What :class:`Verifier` compares: computed once per question."""

    numbers: frozenset[str]
    time: frozenset[str]
    entities: frozenset[str]
    words: frozenset[str]
    negated: bool
    direction: tuple[frozenset[str], frozenset[str]] | None
    sides: tuple[frozenset[int], ...] = ()  # per opposite group: the sides this question uses
    rare: frozenset[str] = frozenset()  # the entities that are only rare lower-case words (matched more loosely)


@dataclass(frozen=True)
class Verifier:
    """Lexical verification of a semantic-cache hit (see the module docstring; no paper defines it: the
    category-aware cache of arXiv 2510.26835 relies on thresholds, which vCache, arXiv 2502.03771, shows give no
    error guarantee). ``vocabulary``: the embedder's whole-word vocabulary; a lower-case word of 5+ letters it
    lacks counts as an entity. ``max_chars``: only this prefix of a question is read."""

    vocabulary: Collection[str] | None = None
    max_chars: int = 4096

    # ---- features ------------------------------------------------------------------------------------------
    def features(self, text: str) -> QueryFeatures:
        text = text[: self.max_chars].replace("’", "'")
        tokens = [(m.group(), m.start()) for m in _TOKEN_RE.finditer(text)]
        lower = text.lower()
        stems = {_stem(t.lower().strip("'")) for t, _ in tokens}
        entities, rare = self._entities(text, tokens)
        return QueryFeatures(
            numbers=self._numbers(text, tokens),
            time=self._time(text, lower),
            entities=entities,
            rare=rare,
            words=self._words(tokens),
            negated=bool(_NEGATION_RE.search(text)),
            direction=self._direction(lower),
            sides=tuple(frozenset(i for i, side in enumerate(g) if side & stems) for g in _OPPOSITES),
        )

    @staticmethod
    def _words(tokens: list[tuple[str, int]]) -> frozenset[str]:
        """Normalised words, each alias's long form and the words of multi-word names ("united states")."""
        out = set()
        for t, _ in tokens:
            w = _norm(t)
            out.add(w)
            if w in _ALIASES:
                out.add(_ALIASES[w])
                out.update(_ALIASES[w].split())
        joined = " ".join(_norm(t) for t, _ in tokens)
        out.update(long for long in set(_ALIASES.values()) if " " in long and f" {long} " in f" {joined} ")
        for short, long in _ALIASES.items():
            if long in out:
                out.add(short)
        return frozenset(out)

    @staticmethod
    def _numbers(text: str, tokens: list[tuple[str, int]]) -> frozenset[str]:
        text = _HALF_RE.sub(lambda m: m.group(1) + ".5", text)
        out = set()
        for m in _NUM_RE.finditer(text):
            s = m.group()
            if "," in s and re.fullmatch(r"\d{1,3}(,\d{3})+", s):
                s = s.replace(",", "")
            s = s.replace(",", ".")
            if "." in s:
                s = s.rstrip("0").rstrip(".") or "0"
            out.add(s.lstrip("0") or "0")
        if re.search(r"\bWar I\b", text):
            out.add("1")  # World War I (a lone "I" is a pronoun everywhere else)
        for tok, _ in tokens:
            for part in tok.split("-"):  # five-year-old
                low = _norm(part) if part.lower().endswith("'s") else part.lower()
                if low in _NUMBER_WORDS:
                    out.add(_NUMBER_WORDS[low])
                elif part.isupper() and low in _ROMAN:
                    out.add(_ROMAN[low])
        return frozenset(out)

    @staticmethod
    def _time(text: str, lower: str) -> frozenset[str]:
        out = set()
        for rx, label in _TIME_RULES:
            for m in rx.finditer(lower):
                out.add(label or m.group().replace(" ", "_"))
        for m in _MONTH_RE.finditer(text):
            if m.group() == "May" and (m.start() == 0 or text[m.end() : m.end() + 2] == " I"):
                continue  # "May I ..."
            out.add(m.group().lower())
        return frozenset(out)

    def _entities(self, text: str, tokens: list[tuple[str, int]]) -> tuple[frozenset[str], frozenset[str]]:
        out, rare = set(), set()
        for tok, pos in tokens:
            low = _norm(tok)
            if not low or low.isdigit():
                continue
            before = text[:pos].rstrip()
            initial = not before or before[-1] in _SENTENCE_END
            has_digit = any(c.isdigit() for c in tok)
            if low in _ALIASES:
                low = _ALIASES[low]  # an entity written short is compared by its long form
            if (
                any(c.isupper() for c in tok[1:])  # JavaScript, iPhone, TSLA, LH400
                or (has_digit and any(c.isalpha() for c in tok))  # I-95, B12, mp3
                or any(c in tok for c in "+#")
                or ("." in tok.strip(".") and not has_digit)  # C++, C#, Node.js
                or low in _TERMS
                or (tok[0].isupper() and not initial and low not in _CAPITAL_STOP)
                or (tok[0].isupper() and initial and low not in _COMMON and tok.lower() not in _COMMON)
            ):
                out.add(low)
            elif self._rare(tok):
                rare.add(low)
        return frozenset(out | rare), frozenset(rare - out)

    def _rare(self, tok: str) -> bool:
        if self.vocabulary is None or not tok.isalpha() or not tok.islower() or len(tok) < 5:
            return False
        return tok not in self.vocabulary and tok not in _COMMON and _norm(tok) not in self.vocabulary

    @staticmethod
    def _side(words: Iterable[str], limit: int = 2) -> frozenset[str]:
        out: list[str] = []
        for w in words:
            w = _norm(w.strip("%$€£"))
            if w in _SIDE_END:
                break
            if not w or w in _ARTICLES or w == "from" or _CUES_RE.fullmatch(w):
                continue
            out.append(w)
            if len(out) == limit:
                break
        return frozenset(out)

    def _direction(self, lower: str) -> tuple[frozenset[str], frozenset[str]] | None:
        for clause in re.split(r"[?!;:,\n]|\.(?:\s|$)", lower):
            m = _HOW_MANY_RE.search(clause)
            if m:
                dst = self._side(m.group(1).split())
                src = self._side(m.group(2).split())
                if src and dst:
                    return src, dst
            if not _CUES_RE.search(clause):
                continue
            words = [w for w, _ in ((m.group(), m.start()) for m in _TOKEN_RE.finditer(clause))]
            for i, w in enumerate(words):
                if w not in ("to", "into") or i == 0 or i == len(words) - 1:
                    continue
                if words[i - 1] in _NOT_BEFORE_TO:
                    continue
                f = max((j for j in range(max(0, i - 5), i) if words[j] == "from"), default=-1)
                src_words = words[f + 1 : i] if f >= 0 else list(reversed(words[max(0, i - 4) : i]))
                src = self._side(src_words)
                dst = self._side(words[i + 1 : i + 5])
                if src and dst:
                    return src, dst
        return None

    # ---- comparison ----------------------------------------------------------------------------------------
    def mismatch(self, a: QueryFeatures, b: QueryFeatures, checks: Iterable[str] = CHECKS) -> str | None:
        """The first check (in ``checks``) on which the two questions differ, or None: the hit may be served."""
        for check in checks:
            if check == "numbers" and a.numbers != b.numbers:
                return check
            if check == "time" and a.time != b.time and {a.time, b.time} != {frozenset(), frozenset({"now"})}:
                return check
            if check == "entities" and self._unmatched(a, b.words) and self._unmatched(b, a.words):
                return check
            if check == "negation" and a.negated != b.negated:
                return check
            if check == "direction" and a.direction and b.direction and self._reversed(a.direction, b.direction):
                return check
            if check == "opposites" and any(x and y and x != y for x, y in zip(a.sides, b.sides, strict=False)):
                return check
        return None

    @staticmethod
    def _unmatched(f: QueryFeatures, words: frozenset[str]) -> bool:
        """Some entity has no equal word on the other side (nor a long shared prefix: refinance/refinancing)."""
        for e in f.entities:
            if e in words or (" " in e and all(p in words for p in e.split())):
                continue
            if len(e) >= 6 and any(
                len(w) >= 6 and len(_common_prefix(e, w)) >= max(6, min(len(e), len(w)) - 1) for w in words
            ):
                continue
            if e in f.rare and len(e) >= 7:  # rare lower-case words: donating/donation
                if any(len(_common_prefix(e, w)) >= max(5, len(e) - 4) for w in words):
                    continue
            return True
        return False

    @staticmethod
    def _reversed(a: tuple[frozenset[str], frozenset[str]], b: tuple[frozenset[str], frozenset[str]]) -> bool:
        both = (a[0] & a[1]) | (b[0] & b[1])
        moved = {x for x in a[0] for y in b[1] if _same(x, y)} | {x for x in a[1] for y in b[0] if _same(x, y)}
        return bool(moved - both)

"""Document cleaning: text normalisation, heuristic quality filters and a harmful-content blocklist.

Every step is switchable and every threshold lives in `clean_config()`. The quality rules follow
the published web-corpus heuristics (Gopher's word-count, word-length, symbol, alphabetic-word and
repetition rules; C4's lines ending in punctuation) with defaults loosened for short documents such
as docstrings. Callers run `normalize`, then `quality_issue` and `Blocklist.match` per document and
count the reasons they return.
"""

import re
import unicodedata
from collections import Counter
from importlib import resources
from pathlib import Path

from ml_collections import ConfigDict

DEFAULT_BLOCKLIST = "blocklist.txt"  # package data next to this module
REGEX_PREFIX = "re:"
TERMINAL_PUNCT = tuple(".!?:;\"'”’»)…。！？")  # a line "ends a sentence" if it ends with one of these

_LINE_BREAKS = re.compile(r"\r\n?|[\x85\u2028\u2029]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")  # Unicode Cc except \t \n, lone surrogates
_TRAILING_SPACE = re.compile(r"[^\S\n]+$", re.MULTILINE)
_BLANK_RUN = re.compile(r"\n{4,}")  # 3+ blank lines
_ALPHA_WORD = re.compile(r"\S*?[^\W\d_]\S*")  # a whitespace-delimited word holding a letter


def clean_config() -> ConfigDict:
    """All cleaning knobs with their defaults."""
    c = ConfigDict()

    c.normalize = n = ConfigDict()
    n.nfc = True  # Unicode NFC normalisation
    n.strip_control = True  # drop control characters (except \n and \t) and lone surrogates
    n.whitespace = True  # \n line endings, no trailing spaces, at most 2 blank lines, none at the ends

    c.quality = q = ConfigDict()
    q.enabled = True  # apply the quality rules below
    q.min_words = 5  # fewest whitespace-separated words
    q.max_words = 100_000  # most words
    q.min_mean_word_len = 3.0  # shortest mean word length in characters
    q.max_mean_word_len = 12.0  # longest mean word length
    q.max_symbol_word_ratio = 0.1  # most ("#" + "..." + "…") per word
    q.min_alpha_word_frac = 0.6  # fewest words holding at least one letter, as a fraction of words
    q.min_punct_line_frac = 0.1  # fewest non-blank lines ending in terminal punctuation, as a fraction
    q.max_dup_line_frac = 0.3  # most non-blank lines repeating an earlier line, as a fraction
    q.max_top_ngram_frac = (0.3, 0.27, 0.24)  # most characters in the top repeated 2-, 3-, 4-, ...-gram (Gopher x1.5)

    c.blocklist = b = ConfigDict()
    b.enabled = True  # drop documents matching a blocklist term
    b.path = ""  # blocklist file; "" = the built-in default list
    b.words = ()  # extra words and phrases
    b.patterns = ()  # extra regular expressions
    return c


def normalize(text: str, cfg: ConfigDict) -> str:
    """Normalise `text` as switched on in `cfg.normalize`; idempotent.

    Line endings (\\r\\n, \\r, U+0085/2028/2029) become \\n, control characters other than \\n and \\t
    are dropped, the result is put in NFC, trailing whitespace is stripped from every line, runs of
    3+ blank lines shrink to 2 and blank lines at both ends are removed.
    """
    n = cfg.normalize
    if n.strip_control or n.whitespace:
        text = _LINE_BREAKS.sub("\n", text)
    if n.strip_control:
        text = _CONTROL.sub("", text)
    if n.nfc:
        text = unicodedata.normalize("NFC", text)
    if n.whitespace:
        text = _TRAILING_SPACE.sub("", text)
        text = _BLANK_RUN.sub("\n\n\n", text).strip("\n")
    return text


def quality_rules(cfg: ConfigDict) -> tuple[str, ...]:
    """Names `quality_issue` can return, in the order the rules are checked."""
    ngrams = tuple(f"top_{n}gram" for n in range(2, 2 + len(cfg.quality.max_top_ngram_frac)))
    return (
        "too_few_words", "too_many_words", "short_words", "long_words", "symbol_ratio",
        "few_alpha_words", "few_punct_lines", "repeated_lines",
    ) + ngrams  # fmt: skip


def top_ngram_frac(words: list[str], n: int, total_chars: int) -> float:
    """Characters covered by all occurrences of the most frequent n-gram, as a fraction of `total_chars`.

    Ties go to the n-gram with the most characters; 0 when no n-gram occurs twice.
    """
    if len(words) <= n:
        return 0.0
    counts = Counter(zip(*(words[i:] for i in range(n)), strict=False))
    top = max(counts.values())
    if top < 2:
        return 0.0
    return top * max(sum(map(len, gram)) for gram, count in counts.items() if count == top) / total_chars


def quality_issue(text: str, cfg: ConfigDict) -> str | None:
    """Name of the first quality rule of `cfg.quality` that `text` fails, or None if it passes."""
    q = cfg.quality
    if not q.enabled:
        return None
    words = text.split()
    n = len(words)
    if n < max(q.min_words, 1):
        return "too_few_words"
    if n > q.max_words:
        return "too_many_words"
    chars = sum(map(len, words))
    if chars / n < q.min_mean_word_len:
        return "short_words"
    if chars / n > q.max_mean_word_len:
        return "long_words"
    symbols = text.count("#") + text.count("...") + text.count("…")
    if symbols / n > q.max_symbol_word_ratio:
        return "symbol_ratio"
    if len(_ALPHA_WORD.findall(text)) / n < q.min_alpha_word_frac:
        return "few_alpha_words"
    lines = [s for line in text.split("\n") if (s := line.strip())]
    if sum(s.endswith(TERMINAL_PUNCT) for s in lines) / len(lines) < q.min_punct_line_frac:
        return "few_punct_lines"
    if 1 - len(set(lines)) / len(lines) > q.max_dup_line_frac:
        return "repeated_lines"
    lower = text.lower().split()
    if len(set(lower)) < n:  # some word repeats, so an n-gram might
        for size, limit in enumerate(q.max_top_ngram_frac, start=2):
            frac = top_ngram_frac(lower, size, chars)
            if frac > limit:
                return f"top_{size}gram"
            if frac == 0:  # no n-gram repeats, so no longer one does
                break
    return None


def _term_body(term: str, is_regex: bool) -> str:
    """Regex source for one blocklist entry: a literal phrase (any whitespace between words) or a regex."""
    return term if is_regex else r"\s+".join(map(re.escape, term.split()))


def _whole_words(body: str) -> str:
    return rf"(?<!\w)(?:{body})(?!\w)"


def check_pattern(pattern: str, where: str) -> None:
    """ValueError naming `where` unless `pattern` compiles and cannot match the empty string."""
    try:
        compiled = re.compile(_whole_words(pattern), re.IGNORECASE)
    except re.error as e:
        raise ValueError(f"{where}: invalid blocklist regex {pattern!r}: {e}") from None
    if compiled.fullmatch(""):
        raise ValueError(f"{where}: blocklist regex {pattern!r} matches the empty string")


class Blocklist:
    """Whole-word, case-insensitive matcher for harmful words, phrases and regular expressions.

    All entries are compiled into one regex. Literal phrases are tried first, longest first (so a
    phrase wins over a word it contains), then the regexes in order; regexes may use groups but not
    numbered back-references.
    """

    def __init__(self, words: tuple[str, ...] = (), patterns: tuple[str, ...] = ()):
        """Compile literal `words`/phrases and regex `patterns`; ValueError naming a bad pattern."""
        for i, pattern in enumerate(patterns):
            check_pattern(pattern, f"blocklist pattern {i}")
        normalized = (" ".join(w.split()).lower() for w in words)
        self.words = tuple(dict.fromkeys(w for w in normalized if w))
        self.patterns = tuple(dict.fromkeys(patterns))
        entries = [(w, False) for w in sorted(self.words, key=len, reverse=True)] + [(p, True) for p in self.patterns]
        self.terms = tuple(REGEX_PREFIX + t if is_regex else t for t, is_regex in entries)
        alternatives = "|".join(f"(?P<_b{i}>{_term_body(t, is_regex)})" for i, (t, is_regex) in enumerate(entries))
        try:
            self.regex = re.compile(_whole_words(alternatives) if entries else "(?!)", re.IGNORECASE)
        except re.error as e:  # e.g. two patterns defining the same group name
            raise ValueError(f"blocklist patterns cannot be combined into one regex: {e}") from None

    @classmethod
    def from_lines(cls, lines: list[str], source: str) -> "Blocklist":
        """Parse blocklist-file lines (`# comment`, phrase, `re:PATTERN`); errors name `source:LINE`."""
        words, patterns = [], []
        for number, raw in enumerate(lines, start=1):
            line = raw.strip()
            if line.startswith(REGEX_PREFIX):
                check_pattern(line[len(REGEX_PREFIX) :], f"{source}:{number}")
                patterns.append(line[len(REGEX_PREFIX) :])
            elif line and not line.startswith("#"):
                words.append(line)
        return cls(tuple(words), tuple(patterns))

    @classmethod
    def from_file(cls, path: str | Path) -> "Blocklist":
        """Read a blocklist file; ValueError naming `path` if it cannot be read or parsed."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read blocklist file {str(path)!r}: {e}") from None
        return cls.from_lines(text.splitlines(), str(path))

    @classmethod
    def default(cls) -> "Blocklist":
        """The built-in list shipped as `lmjax/data/blocklist.txt`."""
        text = resources.files(__package__).joinpath(DEFAULT_BLOCKLIST).read_text(encoding="utf-8")
        return cls.from_lines(text.splitlines(), DEFAULT_BLOCKLIST)

    @classmethod
    def from_config(cls, cfg: ConfigDict) -> "Blocklist":
        """The list a `blocklist` config section describes (file or default, plus extras); empty if disabled."""
        if not cfg.enabled:
            return cls()
        for i, pattern in enumerate(cfg.patterns):
            check_pattern(pattern, f"blocklist.patterns[{i}]")
        base = cls.from_file(cfg.path) if cfg.path else cls.default()
        return cls(base.words + tuple(cfg.words), base.patterns + tuple(cfg.patterns))

    def match(self, text: str) -> str | None:
        """The entry matching earliest in `text` (as listed, lower-cased; regexes as `re:PATTERN`), or None."""
        m = self.regex.search(text)
        return None if m is None else self.terms[int(m.lastgroup[2:])]

    def __len__(self) -> int:
        return len(self.terms)

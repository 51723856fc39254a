"""Document cleaning: text normalisation and heuristic quality filters (the blocklist is lmjax/text/blocklist.py).

Every step is switchable and every threshold lives in `clean_config()`. The quality rules follow
the published web-corpus heuristics (Gopher's word-count, word-length, symbol, alphabetic-word and
repetition rules; C4's lines ending in punctuation) with defaults loosened for short documents such
as docstrings. Callers run `normalize`, then `quality_issue` and `Blocklist.match` per document and
count the reasons they return.
"""

import re
import unicodedata
from collections import Counter

from ml_collections import ConfigDict

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

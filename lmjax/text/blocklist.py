"""A harmful-content blocklist: whole-word, case-insensitive phrases and regexes, used by `data prepare`
and by the serving content filter. The default list ships as `lmjax/text/blocklist.txt`."""

import re
from importlib import resources
from pathlib import Path

from ml_collections import ConfigDict

from lmjax.config import DataError

DEFAULT_BLOCKLIST = "blocklist.txt"  # package data next to this module
REGEX_PREFIX = "re:"


def _term_body(term: str, is_regex: bool) -> str:
    """Regex source for one blocklist entry: a literal phrase (any whitespace between words) or a regex."""
    return term if is_regex else r"\s+".join(map(re.escape, term.split()))


def _whole_words(body: str) -> str:
    return rf"(?<!\w)(?:{body})(?!\w)"


def check_pattern(pattern: str, where: str) -> None:
    """`DataError` naming `where` unless `pattern` compiles and cannot match the empty string."""
    try:
        compiled = re.compile(_whole_words(pattern), re.IGNORECASE)
    except re.error as e:
        raise DataError(f"{where}: invalid blocklist regex {pattern!r}: {e}") from None
    if compiled.fullmatch(""):
        raise DataError(f"{where}: blocklist regex {pattern!r} matches the empty string")


class Blocklist:
    """Whole-word, case-insensitive matcher for harmful words, phrases and regular expressions.

    All entries are compiled into one regex. Literal phrases are tried first, longest first (so a
    phrase wins over a word it contains), then the regexes in order; regexes may use groups but not
    numbered back-references.
    """

    def __init__(self, words: tuple[str, ...] = (), patterns: tuple[str, ...] = ()):
        """Compile literal `words`/phrases and regex `patterns`; `DataError` naming a bad pattern."""
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
            raise DataError(f"blocklist patterns cannot be combined into one regex: {e}") from None

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
        """Read a blocklist file; `DataError` naming `path` if it cannot be read or parsed."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read blocklist file {str(path)!r}: {e}") from None
        return cls.from_lines(text.splitlines(), str(path))

    @classmethod
    def default(cls) -> "Blocklist":
        """The built-in list shipped as `lmjax/text/blocklist.txt`."""
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

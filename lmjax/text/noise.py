"""Seeded noise on prompts, for robustness evaluation (`lmjax eval robust`): typos, word swaps and deletions,
case and whitespace noise, synonyms from a small shipped list (`lmjax/text/synonyms.txt`).

`perturb(text, strength, seed)` touches each word with probability `strength` (so strength is the expected
fraction of words edited; 0 returns the text unchanged) and gives each touched word one edit, of a kind drawn
uniformly from those that apply to it:

- typo: one character edit inside the word: swap two adjacent letters, drop one, double one, or replace one by
  a neighbouring key on a QWERTY keyboard;
- swap: the word trades places with the next word; delete: the word goes (never the last word left);
- case: the word in another case (lower, UPPER or Capitalised);
- space: the space after the word doubled or removed (gluing the next word on);
- synonym: a synonym of the word from the list (only for words in it), keeping its capital and punctuation.

Code is left alone: a word holding a dot, underscore, digit, bracket, backtick or an inner capital
(`json.dumps`, `os.path`, `__init__`, `getattr()`, `DateHeader`) is never edited, swapped or deleted, because
the reference answers name it, so a typo there would change the question rather than its phrasing.
Plain-word names such as `json` alone do get edited.

The randomness of word i comes from (seed, text, i) alone, so the same prompt gets the same noise in every run
and process, and the words edited at a strength are a subset of those edited at any higher strength.
"""

import random
import re
from collections.abc import Sequence
from functools import cache
from importlib import resources

KINDS = ("typo", "swap", "delete", "case", "space", "synonym")
STRENGTHS = {"low": 0.1, "middle": 0.2, "high": 0.4}  # named strengths: expected fraction of words edited
SYNONYMS_FILE = "synonyms.txt"  # package data next to this module

_KEYBOARD = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
_CODE = re.compile(r"[._\d()\[\]{}`<>=/\\]|\w[A-Z]")
_SENTENCE_MARKS = ".,;:!?'\""
_EDGES = re.compile(r"^(\W*)(.*?)(\W*)$", re.DOTALL)


def _neighbours() -> dict[str, str]:
    """Letter -> the letters next to it on a QWERTY keyboard (same row and the rows above and below)."""
    where = {c: (r, i) for r, row in enumerate(_KEYBOARD) for i, c in enumerate(row)}
    return {c: "".join(d for d, (r2, i2) in where.items() if d != c and abs(r2 - r) <= 1 and abs(i2 - i) <= 1)
            for c, (r, i) in where.items()}


NEIGHBOURS = _neighbours()


@cache
def synonyms() -> dict[str, tuple[str, ...]]:
    """The shipped list: lowercase word -> its synonyms."""
    text = resources.files(__package__).joinpath(SYNONYMS_FILE).read_text(encoding="utf-8")
    table = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            word, _, rest = line.partition(":")
            table[word.strip()] = tuple(s.strip() for s in rest.split(",") if s.strip())
    return table


def is_code(word: str) -> bool:
    """Whether a whitespace-separated word looks like code (left alone by `perturb`)."""
    return bool(_CODE.search(word.strip(_SENTENCE_MARKS)))


def has_synonym(word: str) -> bool:
    """Whether the list holds `word` (lowercased, without the punctuation around it)."""
    return _EDGES.match(word).group(2).lower() in synonyms()


def typo(word: str, rng: random.Random) -> str:
    """One character edit of `word` (see the module docstring); punctuation around it is kept."""
    head, core, tail = _EDGES.match(word).groups()
    if not core:
        return word
    op = rng.choice(["swap", "drop", "double", "key"] if len(core) > 1 else ["double", "key"])
    i = rng.randrange(len(core) - (op == "swap"))
    if op == "swap":
        core = core[:i] + core[i + 1] + core[i] + core[i + 2:]
    elif op == "drop":
        core = core[:i] + core[i + 1:]
    elif op == "double":
        core = core[:i] + core[i] + core[i:]
    else:
        near = NEIGHBOURS.get(core[i].lower())
        if near:
            new = rng.choice(near)
            core = core[:i] + (new.upper() if core[i].isupper() else new) + core[i + 1:]
        else:
            core = core[:i] + core[i] + core[i:]
    return head + core + tail


def recase(word: str, rng: random.Random) -> str:
    """`word` in a case it is not already in (lower, UPPER or Capitalised), else unchanged."""
    options = [w for w in (word.lower(), word.upper(), word.capitalize()) if w != word]
    return rng.choice(options) if options else word


def synonym(word: str, rng: random.Random) -> str | None:
    """A synonym of `word` from the list with the word's capitalisation and surrounding punctuation, or None."""
    head, core, tail = _EDGES.match(word).groups()
    choices = synonyms().get(core.lower())
    if not choices:
        return None
    new = rng.choice(choices)
    if core.isupper() and len(core) > 1:
        new = new.upper()
    elif core[:1].isupper():
        new = new[:1].upper() + new[1:]
    return head + new + tail


def perturb(text: str, strength: float, seed: int | str = 0, kinds: Sequence[str] = KINDS) -> str:
    """`text` with seeded noise of the `kinds` at `strength` in [0, 1] (the module docstring has the rules)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown perturbation kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
    parts = re.findall(r"\s+|\S+", text)
    lead = parts.pop(0) if parts and parts[0].isspace() else ""
    words, spaces = parts[0::2], parts[1::2]  # spaces[i] follows words[i]; the last word may have none
    spaces += [""] * (len(words) - len(spaces))
    deleted: set[int] = set()
    for i in range(len(words)):
        rng = random.Random(f"{seed}\x00{text}\x00{i}")
        if rng.random() >= strength or i in deleted or is_code(words[i]):
            continue
        nxt = next((j for j in range(i + 1, len(words)) if j not in deleted), None)
        options = [k for k in kinds if k not in ("swap", "synonym")
                   or (k == "swap" and nxt is not None and not is_code(words[nxt]))
                   or (k == "synonym" and has_synonym(words[i]))]
        if "delete" in options and len(words) - len(deleted) <= 1:
            options.remove("delete")
        if not options:
            continue
        kind = rng.choice(options)
        if kind == "typo":
            words[i] = typo(words[i], rng)
        elif kind == "swap":
            words[i], words[nxt] = words[nxt], words[i]
        elif kind == "delete":
            deleted.add(i)
        elif kind == "case":
            words[i] = recase(words[i], rng)
        elif kind == "space":
            spaces[i] = "" if spaces[i] and rng.random() < 0.5 else (spaces[i] or " ") + " "
        else:
            words[i] = synonym(words[i], rng)
    kept = [(w, s) for j, (w, s) in enumerate(zip(words, spaces, strict=True)) if j not in deleted]
    return lead + "".join(w + s for w, s in kept)

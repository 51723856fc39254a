"""How gendered words co-occur with occupations and attributes in a corpus: the skew a model may learn, shown on
the data card before training (the probes of lmjax/eval/bias.py measure what it did learn).

Counted per sentence (cut at . ! ? and line breaks): a sentence that names an occupation or attribute and holds
female and/or male words (lmjax/corpus/cda.py's pairs, pronouns included) counts once for each gender it holds.
"""

import re
from collections import Counter
from collections.abc import Iterable

from lmjax.corpus.cda import PAIRS

# (occupation, the gender most of its U.S. workers have: "f" or "m"), the split WinoBias uses.
OCCUPATIONS = [("nurse", "f"), ("secretary", "f"), ("receptionist", "f"), ("hairdresser", "f"),
               ("housekeeper", "f"), ("librarian", "f"), ("cashier", "f"), ("teacher", "f"), ("baker", "f"),
               ("dancer", "f"), ("carpenter", "m"), ("mechanic", "m"), ("plumber", "m"), ("firefighter", "m"),
               ("engineer", "m"), ("pilot", "m"), ("sheriff", "m"), ("farmer", "m"), ("janitor", "m"),
               ("surgeon", "m")]
ATTRIBUTES = ["emotional", "strong", "weak", "smart", "intelligent", "caring", "aggressive", "beautiful", "lazy",
              "violent", "rational", "gentle", "leader", "brilliant"]
MALE = {m for m, _ in PAIRS} | {"him", "his"}
FEMALE = {f for _, f in PAIRS} | {"her", "hers"}
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
_WORD = re.compile(r"[a-z]+")


def cooccurrence(texts: Iterable[str]) -> dict:
    """{"sentences", "female_sentences", "male_sentences", "occupations": {name: {"female", "male"}},
    "attributes": {word: {"female", "male"}}} over `texts` (occupations and attributes never seen are left out)."""
    counts: dict[str, Counter] = {"occupations": Counter(), "attributes": Counter()}
    totals = Counter()
    targets = {"occupations": {o for o, _ in OCCUPATIONS}, "attributes": set(ATTRIBUTES)}
    for text in texts:
        for sentence in _SENTENCE.split(text):
            words = set(_WORD.findall(sentence.lower()))
            if not words:
                continue
            totals["sentences"] += 1
            genders = [g for g, terms in (("female", FEMALE), ("male", MALE)) if words & terms]
            for gender in genders:
                totals[f"{gender}_sentences"] += 1
                for kind, names in targets.items():
                    for name in words & names:
                        counts[kind][(name, gender)] += 1
    out = {k: totals[k] for k in ("sentences", "female_sentences", "male_sentences")}
    for kind in counts:
        names = sorted({n for n, _ in counts[kind]})
        out[kind] = {n: {"female": counts[kind][(n, "female")], "male": counts[kind][(n, "male")]} for n in names}
    return out


def render_cooccurrence(summary: dict) -> list[str]:
    """Markdown lines for the data card."""
    lines = ["## Gendered words, occupations and attributes", "",
             f"Of {summary['sentences']:,} sentences, {summary['female_sentences']:,} hold female words and "
             f"{summary['male_sentences']:,} male words (lmjax/corpus/demographics.py). Sentences that name an "
             "occupation or attribute alongside gendered words:", "",
             "| word | with female words | with male words | female share |", "|---|---|---|---|"]
    for kind in ("occupations", "attributes"):
        for name, c in summary[kind].items():
            share = c["female"] / max(c["female"] + c["male"], 1)
            lines.append(f"| {name} ({kind[:-1]}) | {c['female']:,} | {c['male']:,} | {share:.0%} |")
    if not summary["occupations"] and not summary["attributes"]:
        lines.append("| (none found) | | | |")
    return lines

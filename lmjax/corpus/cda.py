"""Counterfactual data augmentation: each text again with its gendered words swapped (he <-> she, man <-> woman,
...), so a model sees every occupation and attribute with both genders as often (`data.cda=true`).

Simplification, as in most CDA work: "her" is ambiguous (him / his); it becomes "his" when a word other than a
conjunction, preposition or article follows, else "him"; "his" always becomes "her" (its use as a pronoun,
"hers", is rarer). Names are not swapped.
"""

import re

PAIRS = [("he", "she"), ("himself", "herself"), ("man", "woman"), ("men", "women"),
         ("boy", "girl"), ("boys", "girls"), ("father", "mother"), ("fathers", "mothers"), ("son", "daughter"),
         ("sons", "daughters"), ("brother", "sister"), ("brothers", "sisters"), ("husband", "wife"),
         ("husbands", "wives"), ("king", "queen"), ("kings", "queens"), ("mr", "mrs"), ("gentleman", "lady"),
         ("gentlemen", "ladies"), ("male", "female"), ("males", "females"), ("uncle", "aunt"), ("nephew", "niece"),
         ("actor", "actress"), ("waiter", "waitress"), ("boyfriend", "girlfriend"), ("grandfather", "grandmother")]
SWAP = {a: b for a, b in PAIRS} | {b: a for a, b in PAIRS}
SWAP |= {"him": "her", "his": "her", "hers": "his", "her": "him"}  # "her" before a word becomes "his": see `_swap`
NOT_OWNED = {"and", "or", "but", "to", "that", "the", "a", "an", "in", "on", "at", "for", "with", "from", "by", "as"}
WORD = re.compile(r"\b(" + "|".join(sorted(SWAP, key=len, reverse=True)) + r")\b", re.IGNORECASE)


def _swap(match: re.Match) -> str:
    word = match.group(0)
    lower = word.lower()
    new = SWAP[lower]
    following = re.match(r"[ \t]+(\w+)", match.string[match.end():]) if lower == "her" else None
    if following and following.group(1).lower() not in NOT_OWNED:
        new = "his"
    if word.isupper() and len(word) > 1:
        return new.upper()
    return new.capitalize() if word[0].isupper() else new


def counterfactual(text: str) -> str:
    """`text` with every gendered word of PAIRS swapped for its counterpart, keeping capitalisation."""
    return WORD.sub(_swap, text)

"""Safety-tuning data for the embedded chat dataset: harmful requests by category with refusals that say why,
and benign look-alikes with real answers (the tables are in `lmjax.corpus.safety_phrasings`).

Held out by subject, within every category: the `HELDOUT_PER_CATEGORY` harmful requests and as many benign
look-alikes with the lowest `hash_unit("safety:" + request)` are held out entirely, in every phrasing, so the
held-out set measures whether refusing carries over to harmful requests (and answering to look-alikes) the model
never saw, not just to new wordings of seen ones. Every category has held-out requests, so results can be read
per category. Fine-tuning sees `TRAIN_PHRASINGS[kind]` of the twelve phrasings of each training request (the
templates are the same for harmful and benign requests; look-alikes get more, so that a phrasing never predicts
a refusal and only the request does); the evaluation (`lmjax eval safety`) asks every held-out request in
every phrasing; the chat dataset's held-out split carries one phrasing of each, for the validation loss.
"""

import random
from typing import NamedTuple

from lmjax.corpus.safety_phrasings import CATEGORIES, SAFETY_TEMPLATES
from lmjax.text.io import hash_unit

HELDOUT_PER_CATEGORY = 2
TRAIN_PHRASINGS = {"harmful": 4, "benign": 6}
KINDS = ("harmful", "benign")


class SafetyPrompt(NamedTuple):
    """One request: its category, kind ("harmful" or "benign"), the request phrase, the prompt asked and, for
    benign look-alikes, the reference answer ("" for harmful requests)."""

    category: str
    kind: str
    request: str
    prompt: str
    answer: str


def requests(category: str, kind: str) -> list[str]:
    """The harmful requests or benign look-alikes of `category`, in table order."""
    table = CATEGORIES[category][kind]
    return list(table) if kind == "benign" else table


def heldout_requests(category: str, kind: str) -> set[str]:
    """The held-out requests of `category` and `kind` (see the module docstring)."""
    ranked = sorted(requests(category, kind), key=lambda r: hash_unit("safety:" + r))
    return set(ranked[:HELDOUT_PER_CATEGORY])


def safety_prompts(split: str, phrasings: int | None = None) -> list[SafetyPrompt]:
    """Every request of `split` ("train" or "heldout") in its first `phrasings` phrasings (default all), by
    category, kind and request."""
    out = []
    for category, table in CATEGORIES.items():
        for kind in KINDS:
            heldout = heldout_requests(category, kind)
            for request in requests(category, kind):
                if (request in heldout) != (split == "heldout"):
                    continue
                answer = table["benign"][request] if kind == "benign" else ""
                out += [SafetyPrompt(category, kind, request, t.format(h=request), answer)
                        for t in SAFETY_TEMPLATES[:phrasings]]
    return out


def reply(prompt: SafetyPrompt, rng: random.Random) -> str:
    """The training reply to `prompt`: one of its category's refusals, or the look-alike's answer."""
    return rng.choice(CATEGORIES[prompt.category]["refusals"]) if prompt.kind == "harmful" else prompt.answer


def safety_pairs(rng: random.Random) -> dict[str, list[tuple[str, str]]]:
    """{"train", "heldout"} (question, reply) pairs: `TRAIN_PHRASINGS` phrasings (drawn by `rng`) of each
    training request, one phrasing of each held-out request."""
    out: dict[str, list[tuple[str, str]]] = {}
    for split in ("train", "heldout"):
        by_request: dict[tuple[str, str], list[SafetyPrompt]] = {}
        for p in safety_prompts(split):
            by_request.setdefault((p.category, p.request), []).append(p)
        out[split] = [(p.prompt, reply(p, rng)) for group in by_request.values()
                      for p in rng.sample(group, TRAIN_PHRASINGS[group[0].kind] if split == "train" else 1)]
    return out

"""An embedded chat dataset: questions and short answers about the running Python's standard library.

Built with zero downloads from what the interpreter already has: docstrings (what a module, class or
function does), `inspect.signature` (how to call it), `__module__` (where it lives) and the
`pydoc_data.topics` help pages (keywords and statements), plus identity questions and safety tuning:
harmful requests by category with refusals that say why, and benign look-alikes with real answers
(`lmjax.corpus.safety_chat`). Every question type has many phrasings (the tables are in
`lmjax.corpus.chat_phrasings`), and conversations stay short (well under 200 tokens) so a
~5M-parameter model with a 256-token context can learn them.

The held-out split is chosen per module by a hash of its name, so evaluation asks about modules never
seen in fine-tuning; safety requests are held out by request within each category (see `safety_chat`).
Each training conversation about a module also comes again with its names made up (`lmjax.corpus.renaming`).
Point `build_chat_dataset` at your own packages to make a dataset about them.
"""

import inspect
import random
import re
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from lmjax.corpus.chat_phrasings import (
    FOLLOW_CONTENTS,
    FOLLOW_MODULE,
    FOLLOW_SIGNATURE,
    IDENTITY,
    KEYWORD_QUESTIONS,
    MODULE_FOR,
    SIGNATURE,
    SYSTEM_PROMPTS,
    TOPIC_QUESTIONS,
    WHAT_CLASS,
    WHAT_DOES,
    WHICH_MODULE,
)
from lmjax.corpus.renaming import dotted_names, renamed
from lmjax.corpus.safety_chat import safety_pairs
from lmjax.corpus.stdlib_docs import cache_dir
from lmjax.corpus.stdlib_facts import (
    MAX_ANSWER_CHARS,
    NOT_PROSE,
    clean_markup,
    expand_packages,
    first_sentence,
    own_doc,
    public_objects,
    safe_import,
    signature_text,
    stdlib_modules,
)
from lmjax.text.chat_template import Message, check_conversation, write_conversations
from lmjax.text.io import hash_unit, read_jsonl, write_jsonl

CHAT_CORPUS_VERSION = 6  # bump when generation rules change, to invalidate caches
MAX_CONVERSATION_CHARS = 640
SYSTEM_PROB = 0.25

Conversation = list[Message]

def is_heldout(module_name: str, heldout_fraction: float) -> bool:
    """Whether `module_name` belongs to the held-out split (a deterministic hash of the name)."""
    return hash_unit(module_name) < heldout_fraction


def _vary(question: str, rng: random.Random) -> str:
    """Light surface noise: sometimes lowercase the first letter or drop the question mark."""
    if rng.random() < 0.15:
        question = question[0].lower() + question[1:]
    if question.endswith("?") and rng.random() < 0.1:
        question = question[:-1]
    return question


def _conversation(turns: Sequence[tuple[str, str]], rng: random.Random, system: bool = True) -> Conversation:
    """Messages from (question, answer) turns, sometimes behind a system prompt."""
    messages = []
    if system and rng.random() < SYSTEM_PROB:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for question, answer in turns:
        messages += [{"role": "user", "content": _vary(question, rng)}, {"role": "assistant", "content": answer}]
    return messages


def _short(conversation: Conversation) -> bool:
    return sum(len(m["content"]) for m in conversation) <= MAX_CONVERSATION_CHARS


def module_conversations(module_name: str, rng: random.Random) -> list[Conversation]:
    """Conversations about one module: what it and its public objects do, signatures, where they live.

    Returns [] if the module is skipped or fails to import. Deterministic given `rng`'s state.
    """
    module = safe_import(module_name)
    if module is None:
        return []
    m = module_name
    out: list[Conversation] = []
    facts = []
    for q, obj in public_objects(module):
        summary = first_sentence(own_doc(obj))
        if summary:
            facts.append((q, obj, summary, signature_text(obj) if callable(obj) else None))
    module_summary = first_sentence(module.__doc__ or "")
    if module_summary:
        module_answer = f"The `{m}` module: {module_summary}"
        out.append(_conversation([(rng.choice(MODULE_FOR).format(m=m), module_answer)], rng))
        top = [q.rsplit(".", 1)[1] for q, *_ in facts if q.count(".") == m.count(".") + 1][:5]
        if len(top) >= 2:
            contents = "It provides " + ", ".join(f"`{n}`" for n in top) + "."
            turns = [(rng.choice(MODULE_FOR).format(m=m), module_answer), (rng.choice(FOLLOW_CONTENTS), contents)]
            out.append(_conversation(turns, rng))
    for q, obj, summary, sig in facts:
        n = q[len(m) + 1:]
        fields = {"q": q, "m": m, "n": n}
        templates = WHAT_DOES + (WHAT_CLASS if inspect.isclass(obj) else [])
        what = (rng.choice(templates).format(**fields), f"`{q}`: {summary}")
        signature = (rng.choice(SIGNATURE).format(**fields), f"`{q}{sig}`") if sig else None
        top_level = "." not in n
        where = (rng.choice(WHICH_MODULE).format(**fields), f"`{n}` is in the `{m}` module: `from {m} import {n}`.")
        out.append(_conversation([what], rng))
        if signature:
            out.append(_conversation([signature], rng))
            if rng.random() < 0.5:
                out.append(_conversation([what, (rng.choice(FOLLOW_SIGNATURE), signature[1])], rng))
        if top_level and rng.random() < 0.5:
            out.append(_conversation([where], rng))
        if top_level and rng.random() < 0.3:
            follow = (rng.choice(FOLLOW_MODULE), where[1])
            out.append(_conversation([what, follow], rng))
    return [c for c in out if _short(c)]


def _topic_prose(text: str) -> tuple[str, str] | None:
    """(title, one or two cleaned sentences) of a `pydoc_data` help topic."""
    title, _, body = text.strip().partition("\n")
    body = body.lstrip("*\n")
    for paragraph in re.split(r"\n\s*\n", body):
        if not paragraph.strip() or paragraph.startswith(" ") or NOT_PROSE.search(paragraph):
            continue
        prose = clean_markup(re.sub(r'"([^"\n]{1,24})"', r"`\1`", re.sub(r"(\w)-\n\s*(\w)", r"\1-\2", paragraph)))
        sentences = re.findall(r".+?[.!?](?=\s+[A-Z(`]|$)", prose)
        if not sentences or sentences[0].endswith(":"):
            return None
        answer = sentences[0]
        if len(answer) < 80 and len(sentences) > 1 and not sentences[1].endswith(":"):
            answer += " " + sentences[1].strip()
        if len(answer) > MAX_ANSWER_CHARS + 80:
            return None
        parts = clean_markup(title.replace('"', "`")).split("`")
        return "`".join(p if i % 2 else p.lower() for i, p in enumerate(parts)), answer
    return None


def keyword_conversations(rng: random.Random) -> list[Conversation]:
    """What Python keywords and statements do, and summaries of the other help topics."""
    import pydoc
    from pydoc_data.topics import topics

    out = []
    keyword_topics = set()
    for keyword, target in sorted(pydoc.Helper.keywords.items()):
        if not isinstance(target, tuple) or target[0] not in topics or not (found := _topic_prose(topics[target[0]])):
            continue
        keyword_topics.add(target[0])
        for template in rng.sample(KEYWORD_QUESTIONS, 3):
            out.append(_conversation([(template.format(k=keyword), found[1])], rng))
    for name in sorted(set(topics) - keyword_topics):
        if found := _topic_prose(topics[name]):
            for template in rng.sample(TOPIC_QUESTIONS, 2):
                out.append(_conversation([(template.format(t=found[0]), found[1])], rng))
    return [c for c in out if _short(c)]


def identity_conversations(rng: random.Random) -> list[Conversation]:
    """Who the assistant is, what it can do, who made it; every phrasing once."""
    return [_conversation([(q, answer)], rng) for answer, questions in IDENTITY.items() for q in questions]


def safety_conversations(rng: random.Random) -> dict[str, list[Conversation]]:
    """{"train", "heldout"}: harmful requests with refusals and benign look-alikes with answers, split by
    request within each category (`lmjax.corpus.safety_chat`)."""
    return {split: [_conversation([pair], rng) for pair in pairs] for split, pairs in safety_pairs(rng).items()}


def _first_user(conversation: Conversation) -> str:
    return next(m["content"] for m in conversation if m["role"] == "user")


def generate_chat_dataset(modules: Sequence[str], heldout_fraction: float = 0.1, seed: int = 0,
                          max_per_module: int = 40) -> dict[str, list[Conversation]]:
    """Generate {"train", "heldout"} for `modules` (packages expanded to their submodules), uncached. Every
    training conversation about a module comes twice: as is, and `renamed`."""
    rng = random.Random(seed)
    split: dict[str, list[Conversation]] = {"train": [], "heldout": []}
    heldout_names: set[str] = set()
    train_modules = []
    for name in expand_packages(modules):
        conversations = module_conversations(name, random.Random(f"{seed}:{name}"))
        conversations = random.Random(f"{seed}:{name}:pick").sample(
            conversations, min(max_per_module, len(conversations)))
        if is_heldout(name, heldout_fraction):
            split["heldout"] += conversations
            heldout_names |= {q for c in conversations for q in dotted_names(c) if q.startswith(name + ".")}
        else:
            train_modules.append((name, conversations))
    renamed_copies = []
    for name, conversations in train_modules:
        kept = [c for c in conversations if not dotted_names(c) & heldout_names]
        made_up = random.Random(f"{seed}:{name}:renamed")
        split["train"] += kept
        renamed_copies += [renamed(c, name, made_up) for c in kept]
    split["train"] += keyword_conversations(rng)
    for conversation in identity_conversations(rng):
        heldout = hash_unit("phrasing:" + _first_user(conversation)) < heldout_fraction
        split["heldout" if heldout else "train"].append(conversation)
    for name, conversations in safety_conversations(rng).items():
        split[name] += conversations
    for conversations in split.values():
        rng.shuffle(conversations)
    split["train"] += renamed_copies  # shuffled in after the held-out split, which stays as it was without them
    random.Random(f"{seed}:renamed").shuffle(split["train"])
    return split


def _cache_path(heldout_fraction: float, seed: int, max_per_module: int) -> Path:
    v = sys.version_info
    key = f"f{heldout_fraction:g}-s{seed}-m{max_per_module}"
    return cache_dir() / f"stdlib-chat-py{v.major}.{v.minor}.{v.micro}-v{CHAT_CORPUS_VERSION}-{key}.jsonl"


def _read_cache(path: Path) -> dict[str, list[Conversation]] | None:
    try:
        split: dict[str, list[Conversation]] = {"train": [], "heldout": []}
        for where, record in read_jsonl(path):
            check_conversation(record["messages"], where)
            split[record["split"]].append(record["messages"])
        return split if split["train"] else None
    except (OSError, ValueError, KeyError, TypeError):  # DataError is a ValueError: regenerate
        return None


def build_chat_dataset(modules: Sequence[str] | None = None, heldout_fraction: float = 0.1, seed: int = 0,
                       max_per_module: int = 40) -> dict[str, list[Conversation]]:
    """{"train": [...], "heldout": [...]} chat conversations about `modules` (default: the stdlib).

    Packages include their public submodules. Each module goes wholly to one split by a hash of its
    name; keyword topics go to train, identity phrasings are split by a hash of the question, safety requests
    by request within each category (`lmjax.corpus.safety_chat`).
    The stdlib default is cached as JSONL under `$LMJAX_CACHE_DIR`, keyed by Python version and arguments.
    """
    if modules is not None:
        return generate_chat_dataset(modules, heldout_fraction, seed, max_per_module)
    path = _cache_path(heldout_fraction, seed, max_per_module)
    if (cached := _read_cache(path)) is not None:
        return cached
    split = generate_chat_dataset(stdlib_modules(), heldout_fraction, seed, max_per_module)
    try:
        write_jsonl(({"split": s, "messages": c} for s, cs in split.items() for c in cs), path)
    except OSError as e:
        warnings.warn(f"could not cache the chat dataset at {path}: {e}", stacklevel=2)
    return split


def write_chat_dataset(out: str, packages: list[str] | None = None,
                   log: Callable[[str], None] = print) -> dict[str, int]:
    """Write `out/train.jsonl` and `out/heldout.jsonl` for `packages` (default: the stdlib); returns counts."""
    start = time.perf_counter()
    split = build_chat_dataset(packages or None)
    Path(out).mkdir(parents=True, exist_ok=True)
    for name, conversations in split.items():
        write_conversations(conversations, Path(out) / f"{name}.jsonl")
    counts = {name: len(conversations) for name, conversations in split.items()}
    log(f"wrote {counts['train']} train and {counts['heldout']} held-out conversations to {out} "
        f"in {time.perf_counter() - start:.1f}s")
    return counts

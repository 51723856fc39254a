"""Made-up names for chat conversations about a module: the same conversation with the module's names
replaced by pronounceable inventions (`json.dumps` -> `vokale.tirumo`), consistently in every turn.

Training on both the real and the renamed conversation teaches a small model to copy the name it is asked
about instead of answering with the memorised name closest to it (docs/benchmarks.md, "Chat (quickstart)").
"""

import random
import re

from lmjax.text.chat_template import Message

Conversation = list[Message]

_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"
_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+"  # json.dumps, os.path
_CODE = re.compile(r"`[^`]*`|" + _DOTTED)


def made_up_word(like: str, rng: random.Random) -> str:
    """A pronounceable made-up identifier shaped like `like`: about as long, the same underscores, digits
    and capitals (`TaskGroup` -> `RivoMesa`, `get_count` -> `dal_tupeka`)."""
    def syllables(n: int) -> str:
        word = ""
        while len(word) < n:
            word += rng.choice(_CONSONANTS) + rng.choice(_VOWELS)
        return word[:max(n, 2)]

    parts = []
    for part in like.split("_"):
        if not part or part.isdigit():
            parts.append(part)
        elif part.isupper():
            parts.append(syllables(len(part)).upper())
        else:
            chunks = re.findall(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])", part) or [part]
            parts.append("".join(syllables(len(c)).capitalize() if c[0].isupper() else syllables(len(c))
                                 for c in chunks))
    return "_".join(parts)


def renamed(conversation: Conversation, module: str, rng: random.Random) -> Conversation:
    """`conversation` about `module` with the module's names made up, consistently: in dotted names and
    `code` spans everywhere, and as bare words in the user's turns ("What is the json module for?"); the
    assistant's prose keeps its words ("JSON (JavaScript Object Notation) ..."). A module named like an
    English word is renamed in the user's prose too ("I saw code.X in some code"): a rare, harmless slip."""
    names = {q for q in dotted_names(conversation) if q == module or q.startswith(module + ".")}
    segments = sorted({s for q in names | {module} for s in q.split(".")}, key=lambda s: (-len(s), s))
    mapping = {s: made_up_word(s, rng) for s in segments}
    word = re.compile(r"\b(?:" + "|".join(map(re.escape, segments)) + r")\b")

    def rename(text: str) -> str:
        return word.sub(lambda w: mapping[w.group()], text)

    return [m if m["role"] == "system" else
            {**m, "content": rename(m["content"]) if m["role"] == "user" else
             _CODE.sub(lambda code: rename(code.group()), m["content"])}
            for m in conversation]


def dotted_names(conversation: Conversation) -> set[str]:
    """The dotted names (`json.dumps`, `os.path`) in a conversation's user and assistant turns."""
    text = " ".join(m["content"] for m in conversation if m["role"] != "system")
    return set(re.findall(_DOTTED, text))

"""The chat template: conversations <-> token ids with a loss mask on the assistant's turns.

lmjax's own template (SentencePiece tokenizers, and Hugging Face ones without a template of their own):

    [bos] <|system|> You are ... <|end|> <|user|> What does ... <|end|> <|assistant|> It ... <|end|> ...

Each turn is its role token, the encoded content and `<|end|>`. The loss mask is 1 on the tokens the
model must learn to produce: the content of assistant turns and their `<|end|>`.

A Hugging Face tokenizer with a Jinja chat template renders it, and the mask is derived from renders of the
conversation's prefixes: an assistant turn is what rendering up to and including it adds to rendering up to it
with a generation prompt (its content and end-of-turn markers). Message contents are encoded as plain text, so
a user cannot type a special token. Conversations are read from JSONL in the common
`{"messages": [{"role": ..., "content": ...}, ...]}` format.
"""

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from lmjax.config import DataError
from lmjax.text.hf_tokenizer import HFTokenizer
from lmjax.text.io import read_jsonl, write_jsonl
from lmjax.text.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
END = "<|end|>"
# lmjax's template in Jinja: given to Hugging Face tokenizers that have no template of their own (with the markers
# as new special tokens) and written into exported tokenizer_config.json files.
JINJA_TEMPLATE = ("{{ bos_token }}{% for message in messages %}"
                  "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")

Message = dict[str, str]


def check_conversation(messages: Sequence[Message], where: str = "conversation") -> None:
    """Raises `DataError` naming `where` unless `messages` is a list of {role, content} with known roles."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} must be {{'role': one of {ROLES}, 'content': str}}, got {m!r}")


def encode_chat(messages: Sequence[Message], tokenizer: Tokenizer | HFTokenizer,
                add_generation_prompt: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, loss mask) of a conversation, both int32 of the same length. With
    `add_generation_prompt`, ends with the assistant's turn marker so the model writes the next reply."""
    if tokenizer.chat_template:
        return _encode_rendered(messages, tokenizer, add_generation_prompt)
    special = tokenizer.special_ids
    ids, mask = [tokenizer.bos_id], [0]
    contents = tokenizer.encode_batch([m["content"] for m in messages]) if messages else []
    for message, content in zip(messages, contents, strict=True):
        learn = int(message["role"] == "assistant")
        ids += [special[f"<|{message['role']}|>"], *content, special[END]]
        mask += [0] + [learn] * (len(content) + 1)
    if add_generation_prompt:
        ids.append(special["<|assistant|>"])
        mask.append(0)
    return np.asarray(ids, np.int32), np.asarray(mask, np.int32)


def _encode_rendered(messages: Sequence[Message], tokenizer: HFTokenizer,
                     add_generation_prompt: bool) -> tuple[np.ndarray, np.ndarray]:
    """`encode_chat` through the tokenizer's Jinja template: the whole render is encoded as `transformers`
    encodes it, except that each message's content is encoded as plain text when it holds special-token text."""
    messages = list(messages)
    text = tokenizer.render_chat(messages, add_generation_prompt)
    ends = [len(tokenizer.render_chat(messages[:i], False)) if i else 0 for i in range(len(messages) + 1)]
    learned, contents = [], []
    for i, message in enumerate(messages):
        if message["role"] == "assistant" and i:
            prompt = tokenizer.render_chat(messages[:i], True)
            if not (ends[i] <= len(prompt) <= ends[i + 1] and text.startswith(prompt)):
                raise DataError("the chat template does not render conversations turn by turn (a conversation "
                                "is not its first turns plus the next one), so the assistant's tokens cannot be "
                                "told apart for the loss mask")
            learned.append((len(prompt), ends[i + 1]))
        content = message["content"]
        if any(t in content for t in tokenizer.special_ids):
            found = [(at, at + len(c)) for c in (content, content.strip())
                     if (at := text.find(c, ends[i], ends[i + 1])) >= 0]
            if not found:
                raise DataError(f"message {i} holds special-token text and the chat template changes it beyond "
                                "stripping spaces, so it cannot be encoded as plain text")
            contents.append(found[0])
    pieces, at = [], 0
    for start, end in contents:  # only messages that hold special-token text are cut out
        pieces += [(at, start, True), (start, end, False)]
        at = end
    pieces.append((at, len(text), True))
    ids, starts = [], []
    for start, end, special in pieces:
        if end > start:
            piece_ids, offsets = tokenizer.encode_with_offsets(text[start:end], special)
            ids += piece_ids
            starts += [start + o for o in offsets]
    mask = [int(any(a <= s < b for a, b in learned)) for s in starts]
    return np.asarray(ids, np.int32), np.asarray(mask, np.int32)


def read_conversations(path: str | Path) -> Iterator[list[Message]]:
    """Conversations from a JSONL file; a malformed line raises `DataError` naming file and line."""
    for where, record in read_jsonl(path):
        messages = record.get("messages") if isinstance(record, dict) else None
        check_conversation(messages, where)
        yield messages


def write_conversations(conversations: Sequence[Sequence[Message]], path: str | Path) -> None:
    """Writes conversations as JSONL (one {"messages": [...]} per line), atomically."""
    write_jsonl(({"messages": list(m)} for m in conversations), path)

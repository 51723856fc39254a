"""The chat template: conversations <-> token ids with a loss mask on the assistant's turns.

    [bos] <|system|> You are ... <|end|> <|user|> What does ... <|end|> <|assistant|> It ... <|end|> ...

Each turn is its role token, the encoded content and `<|end|>`. The loss mask is 1 on the tokens the
model must learn to produce: the content of assistant turns and their `<|end|>`. Conversations are read
from JSONL in the common `{"messages": [{"role": ..., "content": ...}, ...]}` format.
"""

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from lmjax.config import DataError
from lmjax.text.io import read_jsonl, write_jsonl
from lmjax.text.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
END = "<|end|>"

Message = dict[str, str]


def check_conversation(messages: Sequence[Message], where: str = "conversation") -> None:
    """Raises `DataError` naming `where` unless `messages` is a list of {role, content} with known roles."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} must be {{'role': one of {ROLES}, 'content': str}}, got {m!r}")


def encode_chat(messages: Sequence[Message], tokenizer: Tokenizer,
                add_generation_prompt: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, loss mask) of a conversation, both int32 of the same length. With
    `add_generation_prompt`, ends with `<|assistant|>` so the model writes the next reply."""
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


def read_conversations(path: str | Path) -> Iterator[list[Message]]:
    """Conversations from a JSONL file; a malformed line raises `DataError` naming file and line."""
    for where, record in read_jsonl(path):
        messages = record.get("messages") if isinstance(record, dict) else None
        check_conversation(messages, where)
        yield messages


def write_conversations(conversations: Sequence[Sequence[Message]], path: str | Path) -> None:
    """Writes conversations as JSONL (one {"messages": [...]} per line), atomically."""
    write_jsonl(({"messages": list(m)} for m in conversations), path)

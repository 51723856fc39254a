"""The chat template: conversations <-> token ids with a loss mask on the assistant's turns.

    [bos] <|system|> You are ... <|end|> <|user|> What does ... <|end|> <|assistant|> It ... <|end|> ...

Each turn is its role token, the encoded content and `<|end|>`. The loss mask is 1 on the tokens the
model must learn to produce: the content of assistant turns and their `<|end|>`. Conversations are read
from JSONL in the common `{"messages": [{"role": ..., "content": ...}, ...]}` format.
"""

import glob
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from lmjax.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
END = "<|end|>"

Message = dict[str, str]


def check_conversation(messages: Sequence[Message], where: str = "conversation") -> None:
    """Raises ValueError naming `where` unless `messages` is a list of {role, content} with known roles."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: message {i} must be {{'role': one of {ROLES}, 'content': str}}, got {m!r}")


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


def read_jsonl(path: str | Path) -> Iterator[tuple[str, object]]:
    """("file:line", parsed record) per non-blank line; a line that is not JSON raises ValueError naming it."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e})") from None


def read_conversations(path: str | Path) -> Iterator[list[Message]]:
    """Conversations from a JSONL file; a malformed line raises ValueError naming file and line."""
    for where, record in read_jsonl(path):
        messages = record.get("messages") if isinstance(record, dict) else None
        check_conversation(messages, where)
        yield messages


def read_chat(spec: str) -> list[list[Message]]:
    """Conversations of a chat source: `stdlib` / `stdlib:heldout` (the embedded dataset) or a JSONL glob."""
    if spec in ("stdlib", "stdlib:train", "stdlib:heldout"):
        from lmjax.data.chat_corpus import build_chat_dataset

        return build_chat_dataset()["heldout" if spec.endswith("heldout") else "train"]
    files = sorted(glob.glob(spec, recursive=True))
    if not files:
        raise ValueError(f"chat source {spec!r}: no files match; use chat:stdlib, chat:stdlib:heldout or chat:GLOB")
    return [c for path in files for c in read_conversations(path)]


def write_conversations(conversations: Sequence[Sequence[Message]], path: str | Path) -> None:
    """Writes conversations as JSONL (one {"messages": [...]} per line)."""
    with open(path, "w", encoding="utf-8") as f:
        for messages in conversations:
            f.write(json.dumps({"messages": list(messages)}, ensure_ascii=False) + "\n")

"""A chat engine over a trained run: chat template in, streamed reply text out.

One `Sampler` with a batch-1 KV cache of the model's full context serves every turn, so the decode
step compiles once; the prompt is padded to a bucket, so prefill compiles for few lengths.
"""

from collections.abc import Iterator, Sequence
from pathlib import Path

from ml_collections import ConfigDict

from lmjax.config import DataError
from lmjax.infer.sampler import Sampler
from lmjax.model.params import Params, count_params
from lmjax.run.restore import restore_model
from lmjax.run.workdir import Workdir, open_workdir, read_metrics
from lmjax.text.chat_template import Message, check_conversation, encode_chat
from lmjax.text.tokenizer import Tokenizer


class ChatEngine:
    """Streams assistant replies to conversations of {role, content} messages."""

    def __init__(self, cfg: ConfigDict, graphdef, params: Params, tokenizer: Tokenizer, step: int | None = None,
                 workdir: Workdir | None = None):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.step = step
        self.workdir = workdir
        self.num_params = count_params(params)
        self.sampler = Sampler(cfg.model, graphdef, params, tokenizer)
        self.context = self.sampler.max_len

    @classmethod
    def from_workdir(cls, path: str | Path, step: int | None = None) -> "ChatEngine":
        """The engine of a trained run, from checkpoint `step` (default latest)."""
        wd = open_workdir(path)
        cfg, graphdef, params, tokenizer, step = restore_model(wd, step)
        return cls(cfg, graphdef, params, tokenizer, step, wd)

    def reply_budget(self, max_new_tokens: int) -> int:
        """Context slots kept free for the reply: `max_new_tokens`, but at most a quarter of the context."""
        return max(1, min(max_new_tokens, self.context // 4))

    def trim_to_context(self, messages: Sequence[Message], max_new_tokens: int = 128) -> list[Message]:
        """`messages` without their oldest turns (a leading system prompt is kept) so that the prompt
        and `reply_budget(max_new_tokens)` fit the context; `DataError` if the last message cannot."""
        messages = list(messages)
        check_conversation(messages)
        if messages[-1]["role"] != "user":
            raise DataError("the conversation must end with a user message")
        system = messages[:1] if messages[0]["role"] == "system" else []
        turns = messages[len(system):]
        # The template's tokens around the turns (bos ... <|assistant|>), then each message's own tokens.
        frame = len(encode_chat([], self.tokenizer, add_generation_prompt=True)[0])
        sizes = [len(encode_chat([m], self.tokenizer)[0]) - 1 for m in messages]  # minus the bos
        limit = self.context - self.reply_budget(max_new_tokens) - frame
        system_size, turn_sizes = sum(sizes[:len(system)]), sizes[len(system):]
        if turn_sizes[-1] > limit:
            raise DataError(f"the message is {turn_sizes[-1]} tokens but at most {limit} fit the model's "
                            f"context of {self.context} tokens (with {self.reply_budget(max_new_tokens)} kept for "
                            f"the reply): shorten it or lower max_new_tokens")
        if system_size + turn_sizes[-1] > limit:
            raise DataError(f"the system prompt ({system_size} tokens) and the message ({turn_sizes[-1]} "
                            f"tokens) do not fit the model's context of {self.context} tokens: shorten them")
        first = len(turns) - 1
        while first > 0 and system_size + sum(turn_sizes[first - 1:]) <= limit:
            first -= 1
        while turns[first]["role"] != "user":  # start at a user turn
            first += 1
        return system + turns[first:]

    def prompt_ids(self, messages: Sequence[Message], max_new_tokens: int = 128) -> list[int]:
        """Token ids of the (trimmed) conversation, ending with `<|assistant|>`."""
        ids, _ = encode_chat(self.trim_to_context(messages, max_new_tokens), self.tokenizer, add_generation_prompt=True)
        return ids.tolist()

    def stream_reply(self, messages: Sequence[Message], temperature: float = 0.7, top_p: float = 0.9,
                     max_new_tokens: int = 128, seed: int = 0) -> Iterator[str]:
        """Yields the reply text so far after every token, to the end of the turn or max_new_tokens."""
        ids = self.prompt_ids(messages, max_new_tokens)
        last = None
        for texts in self.sampler.stream([], max_new_tokens, temperature, 0, top_p, seed=seed, prompt_ids=[ids]):
            text = texts[0].lstrip()
            if text != last:
                last = text
                yield text

    def warmup(self) -> None:
        """Compiles prefill (shortest bucket) and decode, so the first user does not wait for it."""
        self.reply([{"role": "user", "content": "hi"}], max_new_tokens=2)

    def reply(self, messages: Sequence[Message], **settings) -> str:
        """The whole reply (see `stream_reply`)."""
        text = ""
        for text in self.stream_reply(messages, **settings):  # noqa: B007
            pass
        return text

    def model_card(self) -> dict:
        """Family, size, context, checkpoint step and the last validation metrics of the run."""
        m = self.cfg.model
        card = {"family": m.family, "params": self.num_params, "layers": m.num_layers, "d_model": m.d_model,
                "heads": m.num_heads, "context": self.context, "vocab_size": m.vocab_size, "step": self.step,
                "workdir": str(self.workdir.path) if self.workdir else None, "val": {}}
        for record in read_metrics(self.workdir.metrics_path) if self.workdir else []:
            if any(k.startswith("val_") for k in record):
                card["val"] = {"step": record.get("step"), **{k: v for k, v in record.items() if k.startswith("val_")}}
        return card

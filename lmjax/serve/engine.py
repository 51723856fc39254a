"""A chat engine over a trained run: chat template in, streamed reply text out, many conversations at once.

It owns a continuous-batching `Engine` (lmjax/infer/engine.py) driven by one background thread, started on
first use; the demo, the terminal chat and the HTTP API all submit to it, so several users share the model's
decode steps.
"""

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from ml_collections import ConfigDict

from lmjax.config import DataError
from lmjax.infer.engine import Engine, Update
from lmjax.model.params import Params, count_params
from lmjax.run.restore import restore_model
from lmjax.run.workdir import Workdir, open_workdir, read_metrics
from lmjax.text.chat_template import Message, check_conversation, encode_chat
from lmjax.text.tokenizer import Tokenizer


class ChatEngine:
    """Streams assistant replies to conversations of {role, content} messages."""

    def __init__(self, cfg: ConfigDict, graphdef, params: Params, tokenizer: Tokenizer, step: int | None = None,
                 workdir: Workdir | None = None, num_slots: int = 8):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.step = step
        self.workdir = workdir
        self.num_params = count_params(params)
        self.engine = Engine(cfg.model, graphdef, params, num_slots, end_ids=tokenizer.stop_ids)
        self.context = self.engine.max_len
        q = cfg.compress
        # What `lmjax compress` did to these weights (None for a float run), for the model card and /v1/models.
        self.compression = ({k: q[k] for k in ("quant", "group_size", "prune", "sparsity", "pattern", "source")}
                            if q.source else None)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_workdir(cls, path: str | Path, step: int | None = None, num_slots: int = 8) -> "ChatEngine":
        """The engine of a trained run, from checkpoint `step` (default latest)."""
        wd = open_workdir(path)
        cfg, graphdef, params, tokenizer, step = restore_model(wd, step)
        return cls(cfg, graphdef, params, tokenizer, step, wd, num_slots)

    def start(self, warmup: bool = False) -> None:
        """Starts the thread that runs the engine (after compiling every shape, with `warmup`); idempotent."""
        with self._lock:
            if self._thread is None:
                if warmup:
                    self.engine.warmup()
                self._thread = threading.Thread(target=self.engine.run, args=(self._stop,), daemon=True,
                                                name="lmjax-engine")
                self._thread.start()

    def close(self) -> None:
        """Stops the engine thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def submit(self, prompt_ids: Sequence[int], callback: Callable[[int, Update], None], **settings) -> int:
        """Queues a generation (see `Engine.submit`), starting the engine thread if needed; returns its id."""
        self.start()
        return self.engine.submit(prompt_ids, callback=callback, **settings)

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
        # The template's tokens around the turns (a bos, a default system prompt, ... <|assistant|>), then each
        # message's own tokens: what it adds to the empty conversation. A template that is not additive is
        # caught by the check at the end.
        frame = len(encode_chat([], self.tokenizer, add_generation_prompt=True)[0])
        empty = len(encode_chat([], self.tokenizer)[0])
        sizes = [len(encode_chat([m], self.tokenizer)[0]) - empty for m in messages]
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
        kept = system + turns[first:]
        room = self.context - self.reply_budget(max_new_tokens)
        while len(encode_chat(kept, self.tokenizer, add_generation_prompt=True)[0]) > room:
            later = [i for i, m in enumerate(kept) if i > len(system) and m["role"] == "user"]
            if not later:
                raise DataError(f"the conversation does not fit the model's context of {self.context} tokens "
                                f"with {self.reply_budget(max_new_tokens)} kept for the reply: shorten it")
            kept = system + kept[later[0]:]
        return kept

    def prompt_ids(self, messages: Sequence[Message], max_new_tokens: int = 128) -> list[int]:
        """Token ids of the (trimmed) conversation, ending with `<|assistant|>`."""
        ids, _ = encode_chat(self.trim_to_context(messages, max_new_tokens), self.tokenizer, add_generation_prompt=True)
        return ids.tolist()

    def stream_reply(self, messages: Sequence[Message], temperature: float = 0.7, top_p: float = 0.9,
                     max_new_tokens: int = 128, seed: int = 0) -> Iterator[str]:
        """Yields the reply text so far after every token, to the end of the turn or max_new_tokens. Closing
        the iterator early cancels the generation."""
        ids = self.prompt_ids(messages, max_new_tokens)
        updates: queue.Queue[Update] = queue.Queue()
        request = self.submit(ids, lambda _, update: updates.put(update), max_tokens=max_new_tokens,
                              temperature=temperature, top_p=top_p, seed=seed)
        tokens, last, finished = [], None, False
        try:
            while not finished:
                update = updates.get()
                tokens += update.tokens
                finished = update.finish_reason is not None
                text = self.tokenizer.decode(tokens).lstrip()
                if text != last:
                    last = text
                    yield text
        finally:
            if not finished:
                self.engine.cancel(request)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 128, temperature: float = 0.7,
                 top_p: float = 0.9, seeds: Sequence[int] | None = None) -> list[str]:
        """The reply text to each prompt of token ids (e.g. `prompt_ids`), all generated together; request i
        samples with `seeds[i]` (default i)."""
        updates: queue.Queue[tuple[int, Update]] = queue.Queue()
        seeds = list(seeds) if seeds is not None else list(range(len(prompts)))
        ids = [self.submit(p, lambda i, u: updates.put((i, u)), max_tokens=max_new_tokens, temperature=temperature,
                           top_p=top_p, seed=seed) for p, seed in zip(prompts, seeds, strict=True)]
        tokens: dict[int, list[int]] = {i: [] for i in ids}
        pending = set(ids)
        while pending:
            request, update = updates.get()
            tokens[request] += update.tokens
            if update.finish_reason is not None:
                pending.discard(request)
        return [self.tokenizer.decode(tokens[i]).strip() for i in ids]

    def warmup(self) -> None:
        """Compiles every prefill width and the decode step, so that no user waits for a compilation."""
        self.start(warmup=True)

    def reply(self, messages: Sequence[Message], **settings) -> str:
        """The whole reply (see `stream_reply`)."""
        text = ""
        for text in self.stream_reply(messages, **settings):  # noqa: B007
            pass
        return text

    def model_card(self) -> dict:
        """Family, size, context, checkpoint step and the last validation metrics of the run."""
        m = self.cfg.model
        card = {"family": m.family, "dtype": m.dtype, "params": self.num_params, "layers": m.num_layers,
                "d_model": m.d_model, "heads": m.num_heads, "context": self.context, "vocab_size": m.vocab_size,
                "step": self.step, "workdir": str(self.workdir.path) if self.workdir else None,
                "compression": self.compression, "val": {}}
        for record in read_metrics(self.workdir.metrics_path) if self.workdir else []:
            if any(k.startswith("val_") for k in record):
                card["val"] = {"step": record.get("step"), **{k: v for k, v in record.items() if k.startswith("val_")}}
        return card

"""One API request's sequences on the chat engine: `Choice` holds what a sequence has generated and sent,
`generate` submits the choices and yields text as it becomes safe to send (stop strings found, the content
filter applied, no partial characters), and cancels what the client no longer waits for."""

import asyncio
import dataclasses
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from lmjax.infer.engine import Engine, TokenLogprob, Update
from lmjax.serve.engine import ChatEngine
from lmjax.serve.errors import ApiError
from lmjax.serve.metrics import Metrics
from lmjax.serve.safety import ContentFilter
from lmjax.text.tokenizer import Tokenizer

JOIN_CONTEXT = 4  # prompt tokens decoded before a completion's tokens, for the spacing where they meet


@dataclasses.dataclass(eq=False)
class Choice:
    """One sequence being generated: its tokens, the text made of them and how much of it was sent."""

    index: int
    prompt: list[int]
    prefix: list[int]  # tokens decoded before the generated ones, so that text joins up (completions)
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None
    stop_token: tuple[int, TokenLogprob] | None = None
    text: str = ""
    sent: int = 0
    finish_reason: str | None = None
    request_id: int | None = None
    admitted: float | None = None
    token_times: list[float] = dataclasses.field(default_factory=list)
    logprobs_sent: int = 0  # streamed chat logprobs already sent
    engine: Engine | None = None  # the engine that runs it (a reload may have replaced the live one since)


async def generate(live: ChatEngine, choices: list[Choice], settings: dict, stops: list[str], session: str, *,
                   timeout: float, disconnected: Callable[[], Awaitable[bool]] | None,
                   content_filter: ContentFilter | None, metrics: Metrics) -> AsyncIterator[tuple[Choice, str]]:
    """Runs `choices` on `live`; yields (choice, new text) as text becomes safe to send, and (choice, "") when a
    choice finishes. Unfinished choices are cancelled if the caller stops early (a client disconnect, checked
    with `disconnected` while waiting when given) or after `timeout` seconds (a 504)."""
    loop = asyncio.get_running_loop()
    updates: asyncio.Queue[tuple[Choice, Update]] = asyncio.Queue()
    arrival = time.time()
    deadline = time.monotonic() + timeout
    seed = settings.pop("seed")
    for choice in choices:
        callback = lambda _, update, choice=choice: loop.call_soon_threadsafe(updates.put_nowait, (choice, update))
        choice_seed = secrets.randbelow(2**31) if seed is None else (seed + choice.index) % 2**31
        choice.engine = live.engine
        choice.request_id = live.submit(choice.prompt, callback, seed=choice_seed, **settings)
    pending = set(choices)
    try:
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ApiError(504, f"the request took longer than {timeout:g} s", code="timeout")
            try:
                if updates.empty():
                    async with asyncio.timeout(min(remaining, 0.5)):
                        choice, update = await updates.get()
                else:
                    choice, update = updates.get_nowait()
            except TimeoutError:
                if disconnected is not None and await disconnected():
                    return
                continue
            if choice.finish_reason is not None:
                continue
            delta = apply_update(choice, update, stops, time.time(), live.tokenizer, content_filter, session)
            if delta:
                yield choice, delta
            if choice.finish_reason is not None:
                pending.discard(choice)
                if update.finish_reason is None:
                    choice.engine.cancel(choice.request_id)
                metrics.observe_request(arrival, choice.admitted, choice.token_times, time.time(),
                                        len(choice.prompt), choice.finish_reason)
                yield choice, ""
    finally:
        for choice in pending:
            choice.engine.cancel(choice.request_id)
            metrics.finished("abort")


def apply_update(choice: Choice, update: Update, stops: list[str], now: float, tokenizer: Tokenizer,
                 content_filter: ContentFilter | None, session: str) -> str:
    """Adds an engine update to `choice`: new text, stop strings, the content filter. Returns the text that
    became safe to send (held back: a partial character, the start of a stop string or of a blocked word)."""
    if update.admitted_at is not None:
        choice.admitted = update.admitted_at
    if update.prompt_logprobs is not None:
        choice.prompt_logprobs = update.prompt_logprobs
    choice.tokens += update.tokens
    choice.logprobs += update.logprobs
    choice.token_times += [now] * len(update.tokens)
    choice.stop_token = update.stop_token
    text = _decode(choice, tokenizer)
    finish = update.finish_reason
    safe = len(text)
    if stops:
        found = [i for i in (text.find(s) for s in stops) if i >= 0]
        if found:
            text, finish, safe = text[:min(found)], "stop", min(found)
        else:
            safe = min(safe, len(text) - max((k for s in stops for k in range(1, len(s))
                                              if text.endswith(s[:k])), default=0))
    if content_filter is not None:
        shown, blocked = content_filter.verdict(text)
        if blocked or (finish is not None and shown < len(text)):
            content_filter.record_block(text, session)
            text, finish = text[:shown], "content_filter"
        safe = min(safe, shown)
    if finish is None and text.endswith("\ufffd"):
        safe = min(safe, len(text.rstrip("\ufffd")))
    choice.text = text
    choice.finish_reason = {"cancelled": "abort"}.get(finish, finish)
    end = len(text) if finish is not None else max(safe, choice.sent)
    delta, choice.sent = text[choice.sent:end], max(choice.sent, end)
    return delta


def _decode(choice: Choice, tokenizer: Tokenizer) -> str:
    """The generated text, decoded after the last `JOIN_CONTEXT` tokens of `choice.prefix` so that a space at the
    join is kept."""
    if not choice.prefix:
        return tokenizer.decode(choice.tokens)
    context = choice.prefix[-JOIN_CONTEXT:]
    head = tokenizer.decode(context)
    full = tokenizer.decode(context + choice.tokens)
    return full[len(head):] if full.startswith(head) else tokenizer.decode(choice.tokens)


async def events(generation: AsyncIterator[tuple[Choice, str]] | None,
                 choices: list[Choice]) -> AsyncIterator[tuple[Choice, str]]:
    """The generation's events (closing it when the consumer stops early), or, for an input the content filter
    refused (`generation` None), one event with the refusal and one finishing event per choice."""
    if generation is None:
        for choice in choices:
            choice.sent = len(choice.text)
            yield choice, choice.text
            yield choice, ""
        return
    async with _closing(generation):
        async for event in generation:
            yield event


@asynccontextmanager
async def _closing(generation: AsyncIterator):
    try:
        yield
    finally:
        await generation.aclose()

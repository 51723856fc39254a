"""OpenAI's response format for what `generation` produced: server-sent event streams, usage, and the logprobs
of the chat API (`content` entries with `top_logprobs`) and of the completions API (parallel lists)."""

import json
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi.responses import StreamingResponse

from lmjax.infer.engine import TokenLogprob
from lmjax.serve.errors import ApiError
from lmjax.serve.generation import Choice
from lmjax.text.tokenizer import Tokenizer


def count_completion(usage: dict, choices: list[Choice]) -> None:
    """Fills in `usage`'s completion and total tokens once the choices are done."""
    usage["completion_tokens"] = sum(len(c.tokens) for c in choices)
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]


def sse_response(chunks: AsyncIterator[dict], finish: Callable[[], Awaitable[None]],
           usage_chunk: dict | None) -> StreamingResponse:
    """Server-sent events: each chunk (an error event instead if the generation fails, e.g. times out), then,
    after `finish` has filled in the usage, the usage chunk when the client asked for one, and [DONE]."""
    async def sse() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield _event(chunk)
        except ApiError as e:
            yield _event(json.loads(e.response().body))
        await finish()
        if usage_chunk is not None:
            yield _event({**usage_chunk, "choices": []})
        yield "data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _event(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def chat_logprobs(choice: Choice, top: int, tokenizer: Tokenizer, streamed: bool = False) -> dict:
    """OpenAI chat logprobs of a choice's tokens (when `streamed`, those not sent yet)."""
    start = choice.logprobs_sent if streamed else 0
    entries = choice.logprobs[start:]
    ids = choice.tokens[start:]
    if streamed:
        choice.logprobs_sent = start + len(entries)

    def entry(token_id: int, logprob: float) -> dict:
        return {"token": tokenizer.token_strings([token_id])[0], "logprob": logprob,
                "bytes": tokenizer.token_utf8(token_id)}

    return {"content": [{**entry(t, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top[:top]]}
                        for t, lp in zip(ids, entries, strict=True)], "refusal": None}


def completion_logprobs(choice: Choice, top: int, echo: bool, tokenizer: Tokenizer) -> dict:
    """The completions API's logprobs: tokens, token_logprobs, top_logprobs and text_offset over the prompt (with
    echo; its first token has no log-probability) and the generated tokens, the end token included."""
    ids = list(choice.tokens)
    entries: list[TokenLogprob | None] = list(choice.logprobs)
    if choice.stop_token is not None and choice.finish_reason == "stop" and len(ids) == len(entries):
        ids.append(choice.stop_token[0])
        entries.append(choice.stop_token[1])
    prefix: list[int] = []
    if echo:
        ids = choice.prompt + ids
        entries = [None] + list(choice.prompt_logprobs or [None] * (len(choice.prompt) - 1)) + entries
    else:
        prefix = choice.prompt
    head = len(tokenizer.decode(prefix)) if prefix else 0
    offsets = [len(tokenizer.decode(prefix + ids[:i])) - head for i in range(len(ids))]

    def best(lp: TokenLogprob) -> dict[str, float]:
        out: dict[str, float] = {}
        for token_id, value in lp.top[:top]:
            out.setdefault(tokenizer.token_strings([token_id])[0], value)
        return out

    return {"tokens": tokenizer.token_strings(ids), "token_logprobs": [e.logprob if e else None for e in entries],
            "top_logprobs": [best(e) if e else None for e in entries], "text_offset": offsets}

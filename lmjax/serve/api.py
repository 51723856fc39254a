"""The OpenAI-compatible HTTP API (FastAPI) over a `ChatEngine`.

    POST /v1/chat/completions   messages through the run's chat template; streaming, n, seed, stop, logprobs
    POST /v1/completions        prompt as text, texts, token ids or lists of ids; echo + logprobs score prompts
    GET  /v1/models             the one model this server holds
    POST /v1/feedback           (lmjax) rate or correct a chat completion; stored for `lmjax feedback export`
    POST /admin/reload          (lmjax) switch to another run directory or step without dropping requests
    POST /tokenize, /detokenize, GET /tokenizer_info   the server's tokenizer (lm-eval's remote backend)
    GET  /health                200 once the model is compiled, 503 before
    GET  /metrics               Prometheus metrics (lmjax/serve/metrics.py)

Requests run on the engine's background thread; its callbacks hand every update to the request's asyncio
queue. A reload compiles the new run beside the live one, then sends new requests to it; requests already
running finish on the old engine, which is closed once idle. Errors have OpenAI's shape {"error": {"message",
"type", "param", "code"}}. Nothing is ever truncated silently: a prompt that, with max_tokens, does not fit the
context is refused with the numbers.
"""

import asyncio
import dataclasses
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from lmjax.config import LmjaxError
from lmjax.infer.engine import Engine, TokenLogprob, Update
from lmjax.serve.auth import ApiKey, KeyRing, RateLimited
from lmjax.serve.engine import ChatEngine
from lmjax.serve.feedback import FeedbackStore
from lmjax.serve.metrics import Metrics
from lmjax.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    FeedbackRequest,
    ReloadRequest,
    TokenizeRequest,
)
from lmjax.serve.safety import ContentFilter
from lmjax.text.chat_template import encode_chat

access_log = logging.getLogger("lmjax.access")
JOIN_CONTEXT = 4  # prompt tokens decoded before a completion's tokens, for the spacing where they meet
HTTP_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})  # others count as "other"
log = logging.getLogger(__name__)


@dataclasses.dataclass
class ServeSettings:
    """Limits and switches of one server."""

    model_name: str  # the id clients pass as `model`
    keys: list[ApiKey] | None = None  # None: no authentication (only allowed on loopback by the CLI)
    max_prompt_tokens: int | None = None  # None: the context minus one
    max_tokens: int | None = None  # the largest max_tokens a request may ask for; None: the context
    max_body_bytes: int = 1 << 20  # larger request bodies get 413
    max_queue: int = 256  # requests waiting for a decode slot; more get 503
    request_timeout: float = 600.0  # seconds from arrival to the last token
    log_prompts: bool = False  # put prompt text in the access log
    store_chats: bool = True  # keep chat completions in the feedback store so /v1/feedback can rate them


class ApiError(Exception):
    """An error response in OpenAI's shape."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 405: "invalid_request_error", 409: "conflict", 413: "invalid_request_error",
             422: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable", 504: "timeout"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


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


class Api:
    """The server's state: engine, settings, metrics, keys and stores; `app` is the FastAPI application."""

    def __init__(self, engine: ChatEngine, settings: ServeSettings, feedback: FeedbackStore | None = None,
                 content_filter: ContentFilter | None = None, warmup: bool = True):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.settings = settings
        self.feedback = feedback
        self.filter = content_filter
        self.keyring = KeyRing(settings.keys) if settings.keys is not None else None
        self.metrics = Metrics(settings.model_name, lambda: self.engine.engine.load())
        self.context = engine.context
        self.max_prompt = min(settings.max_prompt_tokens or self.context - 1, self.context - 1)
        self.max_tokens = min(settings.max_tokens or self.context, self.context)
        self.ready = threading.Event()
        self._reloading = threading.Lock()
        self._closing = threading.Event()  # set at shutdown: engines being retired close at once
        self._retiring: list[threading.Thread] = []
        self.created = int(time.time())
        self.app = self._build(warmup)

    # ----------------------------------------------------------------------------------------- application
    def _build(self, warmup: bool) -> FastAPI:
        @asynccontextmanager
        async def lifespan(_: FastAPI):
            def start():
                self.engine.start(warmup=warmup)
                self.ready.set()
                log.info("model %s ready", self.settings.model_name)

            threading.Thread(target=start, daemon=True, name="lmjax-warmup").start()
            yield
            self._closing.set()
            for retire in self._retiring:
                retire.join()
            self.engine.close()

        app = FastAPI(title="lmjax", version="1", lifespan=lifespan,
                      description="OpenAI-compatible API of an lmjax model")
        app.add_exception_handler(ApiError, lambda _, e: e.response())
        app.add_exception_handler(HTTPException, self._http_error)
        app.add_exception_handler(RequestValidationError, self._validation_error)
        auth = [Depends(self._authorize)]
        Key = Annotated[ApiKey | None, Depends(self._authorize)]

        @app.get("/health")
        async def health():
            self._check_ready()
            return {"status": "ok"}

        @app.get("/metrics", response_class=PlainTextResponse)
        async def metrics():
            return PlainTextResponse(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        @app.get("/v1/models", dependencies=auth)
        async def models():
            return {"object": "list", "data": [self._model_card()]}

        @app.get("/v1/models/{model_id:path}", dependencies=auth)
        async def model(model_id: str):
            self._check_model(model_id)
            return self._model_card()

        @app.get("/tokenizer_info", dependencies=auth)
        async def tokenizer_info():
            # bos/eos have no text form here (text never produces a control token), so their text fields are
            # null: a client that would look their ids up by tokenizing the text gets no silently wrong id.
            tok = self.tokenizer
            return {"tokenizer_class": "SentencePiece (lmjax)", "vocab_size": tok.vocab_size,
                    "bos_token": None, "eos_token": None, "pad_token": None, "bos_token_id": tok.bos_id,
                    "eos_token_id": tok.eos_id, "model_max_length": self.context, "special_tokens": tok.special_ids}

        @app.post("/tokenize", dependencies=auth)
        async def tokenize(body: TokenizeRequest):
            if (body.prompt is None) == (body.messages is None):
                raise ApiError(400, "send exactly one of 'prompt' and 'messages'", "prompt")
            if body.messages is not None:
                ids = self._chat_ids(body.messages, body.add_generation_prompt)
            else:
                ids = ([self.tokenizer.bos_id] if body.add_special_tokens else []) + self.tokenizer.encode(body.prompt)
            return {"count": len(ids), "max_model_len": self.context, "tokens": ids,
                    "token_strs": self.tokenizer.token_strings(ids)}

        @app.post("/detokenize", dependencies=auth)
        async def detokenize(body: DetokenizeRequest):
            self._check_ids(body.tokens, "tokens")
            return {"prompt": self.tokenizer.decode(body.tokens)}

        @app.post("/v1/completions")
        async def completions(body: CompletionRequest, request: Request, key: Key):
            return await self._completions(body, request, key)

        @app.post("/v1/chat/completions")
        async def chat_completions(body: ChatCompletionRequest, request: Request, key: Key):
            return await self._chat(body, request, key)

        @app.post("/v1/feedback", dependencies=auth)
        async def feedback(body: FeedbackRequest):
            return await self._feedback(body)

        @app.post("/admin/reload", dependencies=[Depends(self._authorize_admin)])
        async def reload(body: ReloadRequest):
            self._check_ready()
            return await asyncio.to_thread(self._reload, body.workdir, body.step)

        known = {route.path for route in app.routes}
        return Edge(app, self, known)

    def _model_card(self) -> dict:
        live = self.engine
        return {"id": self.settings.model_name, "object": "model", "created": self.created, "owned_by": "lmjax",
                "max_model_len": self.context, "step": live.step,
                "workdir": str(live.workdir.path) if live.workdir else None, "compression": live.compression}

    @staticmethod
    async def _http_error(_: Request, e: HTTPException) -> JSONResponse:
        message = {404: "no such endpoint", 405: "method not allowed"}.get(e.status_code, str(e.detail))
        return ApiError(e.status_code, message, code=str(e.status_code)).response()

    @staticmethod
    async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if first.get("type") == "json_invalid":
            return ApiError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip(),
                            code="invalid_json").response()
        message = "; ".join(f"{'.'.join(str(p) for p in err.get('loc', ()) if p != 'body')}: {err.get('msg')}"
                            for err in errors[:5])
        return ApiError(422, message or "invalid request", where or None, "invalid_value").response()

    async def _authorize(self, request: Request) -> ApiKey | None:
        """The request's key (None without authentication); 401 without a valid key, 429 over its limits."""
        if self.keyring is None:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        key = self.keyring.find(token.strip())
        if key is None:
            raise ApiError(401, "invalid API key", code="invalid_api_key")
        request.state.key_name = key.name
        self._rate(self.keyring.admit_request, key)
        return key

    async def _authorize_admin(self, request: Request) -> None:
        """Like `_authorize`, but the key must be an admin key (`admin = true` in the keys file)."""
        key = await self._authorize(request)
        if key is not None and not key.admin:
            raise ApiError(403, f"key {key.name!r} may not reload the model (needs admin = true)", code="forbidden")

    def _reload(self, workdir: str | None, step: int | None) -> dict:
        """Loads and compiles `workdir` (default: the live run's) at `step`, then makes it live; the old engine
        finishes its running requests and is closed once idle. Same tokenizer and context only."""
        if not self._reloading.acquire(blocking=False):
            raise ApiError(409, "a reload is already running", code="reload_in_progress")
        try:
            live = self.engine
            path = workdir or (str(live.workdir.path) if live.workdir else None)
            if path is None:
                raise ApiError(400, "name the run directory to load ('workdir')", "workdir")
            try:
                new = ChatEngine.from_workdir(path, step, num_slots=live.engine.num_slots)
            except LmjaxError as e:
                raise ApiError(400, f"cannot load {path}: {e}", "workdir", "bad_run") from None
            if new.tokenizer.fingerprint != self.tokenizer.fingerprint or new.context != self.context:
                raise ApiError(400, f"{path} has another tokenizer or context than the live run; start a new server "
                               "for it", "workdir", "incompatible_run")
            new.start(warmup=True)
            self.engine = new
            retire = threading.Thread(target=_retire, args=(live, self._closing), daemon=True, name="lmjax-retire")
            self._retiring.append(retire)
            retire.start()
            log.info("reloaded: %s step %s is live", path, new.step)
            return self._model_card()
        finally:
            self._reloading.release()

    @staticmethod
    def _rate(admit: Callable, *args) -> None:
        try:
            admit(*args)
        except RateLimited as e:
            raise ApiError(429, str(e), code="rate_limit_exceeded", headers={"Retry-After": str(e.retry_after)}) \
                from None

    def _check_ready(self) -> None:
        failure = self.engine.engine.failure
        if failure is not None:
            raise ApiError(503, f"the model engine stopped after an error ({type(failure).__name__}); restart the "
                           "server", code="engine_failed")
        if not self.ready.is_set():
            raise ApiError(503, "the model is loading or compiling; retry shortly", code="not_ready",
                           headers={"Retry-After": "5"})

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.settings.model_name:
            raise ApiError(404, f"model {model!r} does not exist; this server has {self.settings.model_name!r}",
                           "model", "model_not_found")

    def _check_ids(self, ids: list[int], param: str) -> None:
        bad = [i for i in ids if not 0 <= i < self.tokenizer.vocab_size]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0 to {self.tokenizer.vocab_size - 1})",
                           param, "invalid_token")

    def _chat_ids(self, messages: list, add_generation_prompt: bool = True) -> list[int]:
        conversation = [{"role": m.role, "content": m.text()} for m in messages]
        return encode_chat(conversation, self.tokenizer, add_generation_prompt=add_generation_prompt)[0].tolist()

    def _budget(self, prompts: list[list[int]], asked: int | None, param: str, prompt_param: str) -> int:
        """max_tokens for `prompts` (the most the context allows when not `asked`); 400 with the numbers when a
        prompt is too long or the prompt and `asked` do not fit the context."""
        longest = max(len(p) for p in prompts)
        if longest > self.max_prompt:
            raise ApiError(400, f"the prompt is {longest} tokens; this server accepts at most {self.max_prompt} "
                           f"(the model's context is {self.context} tokens)", prompt_param, "context_length_exceeded")
        if asked is None:
            return min(self.max_tokens, self.context - longest)
        if asked > self.max_tokens:
            raise ApiError(400, f"{param} is {asked}; this server allows at most {self.max_tokens}", param,
                           "max_tokens_too_large")
        if longest + asked > self.context:
            raise ApiError(400, f"the prompt ({longest} tokens) and {param} ({asked}) add up to {longest + asked} "
                           f"tokens, more than the model's context of {self.context} tokens: shorten the prompt or "
                           f"lower {param} to at most {self.context - longest}", param, "context_length_exceeded")
        return asked

    def _admit(self, key: ApiKey | None, prompts: list[list[int]], n: int, max_tokens: int) -> None:
        """503 if the queue is full; 429 if `key` is over its tokens per minute (prompts + max_tokens)."""
        sequences = len(prompts) * n
        if sequences > self.settings.max_queue:
            raise ApiError(400, f"the request asks for {sequences} sequences (prompts x n); this server queues at "
                           f"most {self.settings.max_queue}", "n", "too_many_sequences")
        _, waiting, _ = self.engine.engine.load()
        if waiting + sequences > self.settings.max_queue:
            raise ApiError(503, f"the server is at capacity ({waiting} requests waiting); retry shortly",
                           code="queue_full", headers={"Retry-After": "1"})
        if key is not None and self.keyring is not None:
            self._rate(self.keyring.admit_tokens, key, sum(len(p) for p in prompts) + len(prompts) * n * max_tokens)

    # ------------------------------------------------------------------------------------------ generation
    async def _generate(self, request: Request, choices: list[Choice], settings: dict, stops: list[str],
                        stream: bool, session: str) -> AsyncIterator[tuple[Choice, str]]:
        """Runs `choices` on the engine; yields (choice, new text) as text becomes safe to send, and
        (choice, "") when a choice finishes. Unfinished choices are cancelled if the caller stops early (a
        client disconnect) or on the request timeout."""
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[tuple[Choice, Update]] = asyncio.Queue()
        arrival = time.time()
        deadline = time.monotonic() + self.settings.request_timeout
        seed = settings.pop("seed")
        live = self.engine
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
                    raise ApiError(504, f"the request took longer than {self.settings.request_timeout:g} s",
                                   code="timeout")
                try:
                    if updates.empty():
                        async with asyncio.timeout(min(remaining, 0.5)):
                            choice, update = await updates.get()
                    else:
                        choice, update = updates.get_nowait()
                except TimeoutError:
                    if not stream and await request.is_disconnected():
                        return
                    continue
                if choice.finish_reason is not None:
                    continue
                delta = self._apply(choice, update, stops, time.time(), session)
                if delta:
                    yield choice, delta
                if choice.finish_reason is not None:
                    pending.discard(choice)
                    if update.finish_reason is None:
                        choice.engine.cancel(choice.request_id)
                    self.metrics.observe_request(arrival, choice.admitted, choice.token_times, time.time(),
                                                 len(choice.prompt), choice.finish_reason)
                    yield choice, ""
        finally:
            for choice in pending:
                choice.engine.cancel(choice.request_id)
                self.metrics.finished("abort")

    def _apply(self, choice: Choice, update: Update, stops: list[str], now: float, session: str) -> str:
        """Adds an engine update to `choice`: new text, stop strings, the content filter. Returns the text that
        became safe to send (held back: a partial character, the start of a stop string or of a blocked
        word)."""
        if update.admitted_at is not None:
            choice.admitted = update.admitted_at
        if update.prompt_logprobs is not None:
            choice.prompt_logprobs = update.prompt_logprobs
        choice.tokens += update.tokens
        choice.logprobs += update.logprobs
        choice.token_times += [now] * len(update.tokens)
        choice.stop_token = update.stop_token
        text = self._decode(choice)
        finish = update.finish_reason
        safe = len(text)
        if stops:
            found = [i for i in (text.find(s) for s in stops) if i >= 0]
            if found:
                text, finish, safe = text[:min(found)], "stop", min(found)
            else:
                safe = min(safe, len(text) - max((k for s in stops for k in range(1, len(s))
                                                  if text.endswith(s[:k])), default=0))
        if self.filter is not None:
            shown, blocked = self.filter.verdict(text)
            if blocked or (finish is not None and shown < len(text)):
                self.filter.record_block(text, session)
                text, finish = text[:shown], "content_filter"
            safe = min(safe, shown)
        if finish is None and text.endswith("\ufffd"):
            safe = min(safe, len(text.rstrip("\ufffd")))
        choice.text = text
        choice.finish_reason = {"cancelled": "abort"}.get(finish, finish)
        end = len(text) if finish is not None else max(safe, choice.sent)
        delta, choice.sent = text[choice.sent:end], max(choice.sent, end)
        return delta

    def _decode(self, choice: Choice) -> str:
        """The generated text, decoded after the last `JOIN_CONTEXT` tokens of `choice.prefix` so that a space
        at the join is kept."""
        if not choice.prefix:
            return self.tokenizer.decode(choice.tokens)
        context = choice.prefix[-JOIN_CONTEXT:]
        head = self.tokenizer.decode(context)
        full = self.tokenizer.decode(context + choice.tokens)
        return full[len(head):] if full.startswith(head) else self.tokenizer.decode(choice.tokens)

    # ------------------------------------------------------------------------------------------- endpoints
    async def _chat(self, body: ChatCompletionRequest, request: Request, key: ApiKey | None):
        self._check_ready()
        self._check_model(body.model)
        if body.messages[-1].role != "user":
            raise ApiError(400, "the last message must be from the user", "messages")
        prompt = self._chat_ids(body.messages)
        max_tokens = self._budget([prompt], body.token_limit(), "max_tokens" if body.max_completion_tokens is None
                                  else "max_completion_tokens", "messages")
        self._admit(key, [prompt], body.n, max_tokens)
        completion_id = f"chatcmpl-{secrets.token_hex(12)}"
        session = body.user or completion_id
        step = self.engine.step
        choices = [Choice(i, prompt, []) for i in range(body.n)]
        request.state.usage = usage = {"prompt_tokens": len(prompt), "completion_tokens": 0}
        if self.settings.log_prompts:
            request.state.prompt = [m.model_dump() for m in body.messages]
        if self.filter is not None and any(self.filter.screen_input(m.text(), session) for m in body.messages
                                           if m.role != "assistant"):
            for choice in choices:
                choice.text, choice.finish_reason = self.filter.refusal, "content_filter"
                self.metrics.finished("content_filter")
            generation = None
        else:
            settings = {"max_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p,
                        "seed": body.seed}
            generation = self._generate(request, choices, settings, body.stop_strings(), body.stream, session)
        head = {"id": completion_id, "created": int(time.time()), "model": self.settings.model_name}
        top = (body.top_logprobs or 0) if body.logprobs else None

        async def finish() -> None:
            _count_completion(usage, choices)
            if self.feedback is not None and self.settings.store_chats and generation is not None:
                conversation = [{"role": m.role, "content": m.text()} for m in body.messages]
                for choice in choices:
                    await asyncio.to_thread(self.feedback.record_reply, conversation, choice.text, step,
                                            {"temperature": body.temperature, "top_p": body.top_p,
                                             "max_tokens": max_tokens}, session, f"{completion_id}:{choice.index}")

        if body.stream:
            chunk = {**head, "object": "chat.completion.chunk", **({"usage": None} if body.include_usage() else {})}

            async def chunks() -> AsyncIterator[dict]:
                for choice in choices:
                    yield {**chunk, "choices": [{"index": choice.index, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]}
                async for choice, delta in _events(generation, choices):
                    logprobs = self._chat_logprobs(choice, top, streamed=True) if top is not None else None
                    done = choice.finish_reason if not delta else None
                    yield {**chunk, "choices": [{"index": choice.index, "delta": {"content": delta} if delta else {},
                                                 "logprobs": logprobs, "finish_reason": done}]}

            return _stream(chunks(), finish, {**chunk, "usage": usage} if body.include_usage() else None)
        async for _ in _events(generation, choices):
            pass
        await finish()
        return {**head, "object": "chat.completion", "usage": usage,
                "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                             "logprobs": self._chat_logprobs(c, top) if top is not None else None,
                             "finish_reason": c.finish_reason} for c in choices]}

    def _chat_logprobs(self, choice: Choice, top: int, streamed: bool = False) -> dict:
        """OpenAI chat logprobs of a choice's tokens (when `streamed`, those not sent yet)."""
        start = choice.logprobs_sent if streamed else 0
        entries = choice.logprobs[start:]
        ids = choice.tokens[start:]
        if streamed:
            choice.logprobs_sent = start + len(entries)
        tok = self.tokenizer

        def entry(token_id: int, logprob: float) -> dict:
            return {"token": tok.token_strings([token_id])[0], "logprob": logprob, "bytes": tok.token_utf8(token_id)}

        return {"content": [{**entry(t, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top[:top]]}
                            for t, lp in zip(ids, entries, strict=True)], "refusal": None}

    async def _completions(self, body: CompletionRequest, request: Request, key: ApiKey | None):
        self._check_ready()
        self._check_model(body.model)
        prompts = self._prompt_ids(body.prompt)
        max_tokens = self._budget(prompts, body.max_tokens, "max_tokens", "prompt")
        if max_tokens == 0 and not body.echo:
            raise ApiError(400, "max_tokens 0 returns nothing without echo", "max_tokens")
        self._admit(key, prompts, body.n, max_tokens)
        completion_id = f"cmpl-{secrets.token_hex(12)}"
        choices = [Choice(p * body.n + i, ids, ids) for p, ids in enumerate(prompts) for i in range(body.n)]
        request.state.usage = usage = {"prompt_tokens": sum(len(p) for p in prompts), "completion_tokens": 0}
        if self.settings.log_prompts:
            request.state.prompt = body.prompt
        settings = {"max_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p,
                    "seed": body.seed, "prompt_logprobs": body.echo and body.logprobs is not None}
        if self.filter is not None and any(self.filter.screen_input(self.tokenizer.decode(p), completion_id)
                                           for p in prompts):
            for choice in choices:
                choice.text, choice.finish_reason = "", "content_filter"
                self.metrics.finished("content_filter")
            generation = None
        else:
            generation = self._generate(request, choices, settings, body.stop_strings(), body.stream, completion_id)
        head = {"id": completion_id, "object": "text_completion", "created": int(time.time()),
                "model": self.settings.model_name}

        async def finish() -> None:
            _count_completion(usage, choices)

        if body.stream:
            chunk = {**head, **({"usage": None} if body.include_usage() else {})}

            async def chunks() -> AsyncIterator[dict]:
                echoed = set()
                async for choice, delta in _events(generation, choices):
                    text = delta
                    if body.echo and choice.index not in echoed:
                        echoed.add(choice.index)
                        text = self.tokenizer.decode(choice.prompt) + delta
                    logprobs = None
                    if body.logprobs is not None and not delta:
                        logprobs = self._legacy_logprobs(choice, body.logprobs, body.echo)
                    yield {**chunk, "choices": [{"index": choice.index, "text": text, "logprobs": logprobs,
                                                 "finish_reason": choice.finish_reason if not delta else None}]}

            return _stream(chunks(), finish, {**chunk, "usage": usage} if body.include_usage() else None)
        async for _ in _events(generation, choices):
            pass
        await finish()
        return {**head, "usage": usage, "choices": [
            {"index": c.index, "text": (self.tokenizer.decode(c.prompt) if body.echo else "") + c.text,
             "logprobs": self._legacy_logprobs(c, body.logprobs, body.echo) if body.logprobs is not None else None,
             "finish_reason": c.finish_reason} for c in choices]}

    def _prompt_ids(self, prompt: Any) -> list[list[int]]:
        """Token-id lists of a completions prompt: text gets the bos token, token ids are taken as they are."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if isinstance(prompt[0], int):
            prompt = [prompt]
        prompts = []
        for item in prompt:
            if isinstance(item, str):
                prompts.append([self.tokenizer.bos_id] + self.tokenizer.encode(item))
            else:
                self._check_ids(item, "prompt")
                prompts.append(list(item))
        return prompts

    def _legacy_logprobs(self, choice: Choice, top: int, echo: bool) -> dict:
        """The completions API's logprobs: tokens, token_logprobs, top_logprobs and text_offset over the prompt
        (with echo; its first token has no log-probability) and the generated tokens, the end token included."""
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
        tok = self.tokenizer
        head = len(tok.decode(prefix)) if prefix else 0
        offsets = [len(tok.decode(prefix + ids[:i])) - head for i in range(len(ids))]

        def best(lp: TokenLogprob) -> dict[str, float]:
            out: dict[str, float] = {}
            for token_id, value in lp.top[:top]:
                out.setdefault(tok.token_strings([token_id])[0], value)
            return out

        return {"tokens": tok.token_strings(ids), "token_logprobs": [e.logprob if e else None for e in entries],
                "top_logprobs": [best(e) if e else None for e in entries], "text_offset": offsets}

    async def _feedback(self, body: FeedbackRequest) -> dict:
        if self.feedback is None or not self.settings.store_chats:
            raise ApiError(404, "this server does not store chat completions, so there is nothing to rate",
                           code="feedback_disabled")
        if body.rating is None and body.edited is None:
            raise ApiError(400, "send a 'rating' (1 or -1), an 'edited' reply, or both", "rating")
        reply = await asyncio.to_thread(self.feedback.find_reply, f"{body.id}:{body.choice}")
        if reply is None:
            raise ApiError(404, f"no stored chat completion {body.id!r} with choice {body.choice}", "id",
                           "completion_not_found")
        if body.rating is not None:
            await asyncio.to_thread(self.feedback.rate, reply, body.rating)
        if body.edited is not None:
            if not body.edited.strip():
                raise ApiError(400, "the edited reply is empty", "edited")
            await asyncio.to_thread(self.feedback.edit, reply, body.edited)
        return {"id": body.id, "choice": body.choice, "stored": True}


async def _events(generation: AsyncIterator[tuple[Choice, str]] | None,
                  choices: list[Choice]) -> AsyncIterator[tuple[Choice, str]]:
    """The generation's events, or (for a refused input) one finishing event per choice."""
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


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _count_completion(usage: dict, choices: list[Choice]) -> None:
    """Fills in `usage`'s completion and total tokens once the choices are done."""
    usage["completion_tokens"] = sum(len(c.tokens) for c in choices)
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]


def _stream(chunks: AsyncIterator[dict], finish: Callable[[], Awaitable[None]],
            usage_chunk: dict | None) -> StreamingResponse:
    """Server-sent events: each chunk (an error event instead if the generation fails, e.g. times out), then,
    after `finish` has filled in the usage, the usage chunk when the client asked for one, and [DONE]."""
    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield _sse(chunk)
        except ApiError as e:
            yield _sse(json.loads(e.response().body))
        await finish()
        if usage_chunk is not None:
            yield _sse({**usage_chunk, "choices": []})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class Edge:
    """ASGI middleware around the app: request ids, the body-size limit (413), HTTP metrics and the JSON
    access log (request id, key name, tokens, latency, status; prompt text only with `log_prompts`)."""

    def __init__(self, app: FastAPI, api: Api, known_paths: set[str]):
        self.app, self.api, self.known = app, api, known_paths

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = secrets.token_hex(8)
        state = scope.setdefault("state", {})
        status = {"code": 500}
        limit = self.api.settings.max_body_bytes

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        received = {"bytes": 0}

        async def limited_receive() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                received["bytes"] += len(message.get("body", b""))
                if received["bytes"] > limit:
                    raise HTTPException(413, f"the request body is larger than {limit} bytes")
            return message

        try:
            length = dict(scope.get("headers", [])).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > limit:
                await ApiError(413, f"the request body is {int(length)} bytes; the limit is {limit}",
                               code="body_too_large").response()(scope, receive, send_with_id)
            else:
                await self.app(scope, limited_receive, send_with_id)
        finally:
            path = scope.get("path", "")
            route = scope.get("route")
            handler = getattr(route, "path", path if path in self.known else "unmatched")
            method = scope.get("method", "")
            self.api.metrics.http(handler, method if method in HTTP_METHODS else "other", status["code"])
            record = {"time": round(time.time(), 3), "request_id": request_id, "method": scope.get("method"),
                      "path": path, "status": status["code"], "key": state.get("key_name"),
                      "latency_s": round(time.perf_counter() - start, 4), **(state.get("usage") or {})}
            if "prompt" in state:
                record["prompt"] = state["prompt"]
            access_log.info(json.dumps(record, ensure_ascii=False))


def _retire(engine: ChatEngine, closing: threading.Event, grace: float = 1.0) -> None:
    """Closes a replaced engine once it has had no work for `grace` seconds (requests that picked it just
    before the switch still get submitted and served), or at once when the server shuts down (`closing`)."""
    idle_since = time.monotonic()
    while time.monotonic() - idle_since < grace and not closing.wait(0.1):
        if engine.engine.has_work():
            idle_since = time.monotonic()
    engine.close()


def create_app(engine: ChatEngine, settings: ServeSettings, feedback: FeedbackStore | None = None,
               content_filter: ContentFilter | None = None, warmup: bool = True) -> Edge:
    """The ASGI application of a server (the engine compiles in the background at startup with `warmup`)."""
    return Api(engine, settings, feedback, content_filter, warmup).app

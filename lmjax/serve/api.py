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
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from lmjax.serve.auth import ApiKey, KeyRing, RateLimited
from lmjax.serve.edge import Edge
from lmjax.serve.engine import ChatEngine
from lmjax.serve.errors import ApiError, http_error, validation_error
from lmjax.serve.feedback import FeedbackStore
from lmjax.serve.generation import Choice, events, generate
from lmjax.serve.metrics import Metrics
from lmjax.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    FeedbackRequest,
    ReloadRequest,
    TokenizeRequest,
)
from lmjax.serve.reload import LiveEngine
from lmjax.serve.safety import ContentFilter
from lmjax.serve.wire import chat_logprobs, completion_logprobs, count_completion, sse_response
from lmjax.text.chat_template import encode_chat

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


class Api:
    """The server's state: engine, settings, metrics, keys and stores; `app` is the FastAPI application."""

    def __init__(self, engine: ChatEngine, settings: ServeSettings, feedback: FeedbackStore | None = None,
                 content_filter: ContentFilter | None = None, warmup: bool = True):
        self.live = LiveEngine(engine)
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
        self.created = int(time.time())
        self.app = self._build(warmup)

    @property
    def engine(self) -> ChatEngine:
        """The live engine (a reload replaces it)."""
        return self.live.current

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
            self.live.close()

        app = FastAPI(title="lmjax", version="1", lifespan=lifespan,
                      description="OpenAI-compatible API of an lmjax model")
        app.add_exception_handler(ApiError, lambda _, e: e.response())
        app.add_exception_handler(HTTPException, http_error)
        app.add_exception_handler(RequestValidationError, validation_error)
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
        return Edge(app, self.metrics, self.settings.max_body_bytes, known)

    def _model_card(self) -> dict:
        live = self.engine
        return {"id": self.settings.model_name, "object": "model", "created": self.created, "owned_by": "lmjax",
                "max_model_len": self.context, "step": live.step,
                "workdir": str(live.workdir.path) if live.workdir else None, "compression": live.compression}

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
        """Makes `workdir` (default: the live run's) at `step` live (`LiveEngine.replace`); its model card."""
        new = self.live.replace(workdir, step)
        log.info("reloaded: %s step %s is live", new.workdir.path, new.step)
        return self._model_card()

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
    def _generate(self, request: Request, choices: list[Choice], settings: dict, stops: list[str], stream: bool,
                  session: str) -> AsyncIterator[tuple[Choice, str]]:
        """`choices` running on the live engine (`lmjax.serve.generation.generate`); a non-streamed request
        watches for the client going away while it waits (Starlette cancels a streamed response itself when its
        client disconnects)."""
        return generate(self.engine, choices, settings, stops, session, timeout=self.settings.request_timeout,
                        disconnected=None if stream else request.is_disconnected, content_filter=self.filter,
                        metrics=self.metrics)

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
            count_completion(usage, choices)
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
                async for choice, delta in events(generation, choices):
                    logprobs = chat_logprobs(choice, top, self.tokenizer, streamed=True) if top is not None else None
                    done = choice.finish_reason if not delta else None
                    yield {**chunk, "choices": [{"index": choice.index, "delta": {"content": delta} if delta else {},
                                                 "logprobs": logprobs, "finish_reason": done}]}

            return sse_response(chunks(), finish, {**chunk, "usage": usage} if body.include_usage() else None)
        async for _ in events(generation, choices):
            pass
        await finish()
        return {**head, "object": "chat.completion", "usage": usage,
                "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                             "logprobs": chat_logprobs(c, top, self.tokenizer) if top is not None else None,
                             "finish_reason": c.finish_reason} for c in choices]}

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
            count_completion(usage, choices)

        if body.stream:
            chunk = {**head, **({"usage": None} if body.include_usage() else {})}

            async def chunks() -> AsyncIterator[dict]:
                echoed = set()
                async for choice, delta in events(generation, choices):
                    text = delta
                    if body.echo and choice.index not in echoed:
                        echoed.add(choice.index)
                        text = self.tokenizer.decode(choice.prompt) + delta
                    logprobs = None
                    if body.logprobs is not None and not delta:
                        logprobs = completion_logprobs(choice, body.logprobs, body.echo, self.tokenizer)
                    yield {**chunk, "choices": [{"index": choice.index, "text": text, "logprobs": logprobs,
                                                 "finish_reason": choice.finish_reason if not delta else None}]}

            return sse_response(chunks(), finish, {**chunk, "usage": usage} if body.include_usage() else None)
        async for _ in events(generation, choices):
            pass
        await finish()
        return {**head, "usage": usage, "choices": [
            {"index": c.index, "text": (self.tokenizer.decode(c.prompt) if body.echo else "") + c.text,
             "logprobs": (completion_logprobs(c, body.logprobs, body.echo, self.tokenizer)
                          if body.logprobs is not None else None),
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


def create_app(engine: ChatEngine, settings: ServeSettings, feedback: FeedbackStore | None = None,
               content_filter: ContentFilter | None = None, warmup: bool = True) -> Edge:
    """The ASGI application of a server (the engine compiles in the background at startup with `warmup`)."""
    return Api(engine, settings, feedback, content_filter, warmup).app

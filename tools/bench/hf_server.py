"""A minimal OpenAI-style completions server around Hugging Face `model.generate`: the serving peer of
tools/bench/serve.py.

It serves the way tutorials do: one model, one request generating at a time (a single worker thread runs
`generate`, so later requests wait their turn in arrival order), tokens streamed as they come out of
`generate` through a streamer. No batching across requests.

    .venv/bin/python tools/bench/hf_server.py --model DIR [--host 127.0.0.1] [--port 8001] [--threads 2]

DIR is a `save_pretrained` directory of a causal LM with a SentencePiece `tokenizer.model`. Endpoints:

    GET  /health              200 once the model is loaded
    GET  /v1/models           the one model
    POST /v1/completions      prompt (text or a list of token ids), max_tokens, temperature, top_p, seed,
                              stream, stream_options.include_usage; streamed as SSE `data: {chunk}` lines
                              in OpenAI's text_completion shape, then `data: [DONE]`
"""

import argparse
import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch
import uvicorn
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer


class CompletionRequest(BaseModel):
    """The fields of OpenAI's /v1/completions request that this server understands."""

    model: str | None = None
    prompt: str | list[int]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None


class _QueueStreamer(BaseStreamer):
    """Hands each new token id from `generate` (running in a worker thread) to an asyncio queue; `None`
    marks the end. The first `put` is the prompt and is skipped."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
        self.loop = loop
        self.queue = queue
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, token)

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


class _StopWhenSet(StoppingCriteria):
    """Stops generation once `event` is set (the client went away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


class Generator:
    """The model, its tokenizer and the single thread that runs `generate`."""

    def __init__(self, model_dir: Path):
        self.name = model_dir.name
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
        self.eos_id = self.model.generation_config.eos_token_id
        self.end_ids = set(self.eos_id) if isinstance(self.eos_id, list) else {self.eos_id}
        self.pad_id = self.model.generation_config.pad_token_id
        self.context = self.model.config.max_position_embeddings
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")

    def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids of the prompt: ids as given, text as SentencePiece encodes it (no BOS added)."""
        ids = self.sp.encode(prompt) if isinstance(prompt, str) else list(prompt)
        vocab = self.model.config.vocab_size
        if not ids or any(not 0 <= i < vocab for i in ids):
            raise HTTPException(400, f"prompt must be non-empty text or token ids in [0, {vocab})")
        return ids

    def _generate(self, ids: list[int], request: CompletionRequest, streamer: _QueueStreamer,
                  stop: threading.Event) -> None:
        if request.seed is not None:
            torch.manual_seed(request.seed)
        sample = request.temperature > 0
        with torch.inference_mode():
            try:
                self.model.generate(
                    torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                    max_new_tokens=request.max_tokens, do_sample=sample,
                    temperature=request.temperature if sample else None, top_p=request.top_p if sample else None,
                    top_k=None, eos_token_id=self.eos_id, pad_token_id=self.pad_id, streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_StopWhenSet(stop)]))
            except Exception:
                streamer.end()  # unblocks the reader, which then gets the exception from the job
                raise

    async def tokens(self, ids: list[int], request: CompletionRequest) -> AsyncIterator[int]:
        """The new token ids of one request as `generate` produces them, once its turn comes (the end-of-text
        token that stops it is not one of them)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        job = loop.run_in_executor(self.worker, self._generate, ids, request, _QueueStreamer(loop, queue), stop)
        try:
            while (token := await queue.get()) is not None:
                if token not in self.end_ids:
                    yield token
            await job
        finally:
            stop.set()


def create_app(generator: Generator) -> FastAPI:
    """The FastAPI app serving `generator`."""
    app = FastAPI(title="transformers generate server")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": generator.name, "object": "model", "owned_by": "hf_server"}]}

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest):
        ids = generator.encode(request.prompt)
        if len(ids) + request.max_tokens > generator.context:
            raise HTTPException(400, f"prompt ({len(ids)}) + max_tokens ({request.max_tokens}) exceeds the "
                                     f"context of {generator.context} tokens")
        completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str, finish_reason: str | None) -> dict:
            return {"id": completion_id, "object": "text_completion", "created": created, "model": generator.name,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}

        def usage(new: int) -> dict:
            return {"prompt_tokens": len(ids), "completion_tokens": new, "total_tokens": len(ids) + new}

        if not request.stream:
            new = [t async for t in generator.tokens(ids, request)]
            body = chunk(generator.sp.decode(new), "length" if len(new) >= request.max_tokens else "stop")
            return JSONResponse({**body, "usage": usage(len(new))})

        async def events() -> AsyncIterator[str]:
            new: list[int] = []
            text = ""
            async for token in generator.tokens(ids, request):
                new.append(token)
                full = generator.sp.decode(new)
                piece, text = full[len(text):], full
                yield f"data: {json.dumps(chunk(piece, None))}\n\n"
            reason = "length" if len(new) >= request.max_tokens else "stop"
            yield f"data: {json.dumps(chunk('', reason))}\n\n"
            if (request.stream_options or {}).get("include_usage"):
                yield f"data: {json.dumps({**chunk('', None), 'choices': [], 'usage': usage(len(new))})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="save_pretrained directory with tokenizer.model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    app = create_app(Generator(args.model))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()

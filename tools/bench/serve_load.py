"""The serving benchmark's load generator (tools/bench/serve.py drives it): the seeded request mix, a server under
test started as a subprocess on a free localhost port, and closed-loop clients sending it streamed greedy
`/v1/completions` requests, timed chunk by chunk.
"""

import asyncio
import dataclasses
import json
import math
import os
import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

REPO = Path(__file__).resolve().parents[2]
PROMPT_LENS = (16, 32, 64, 128)
OUTPUT_LENS = (32, 64, 96, 120)  # the longest prompt + reply (+ a BOS) fits tiny's 256-token context


# --- the request mix ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One request of the mix: the prompt as token ids and as text, and its max_tokens."""

    ids: list[int]
    text: str
    max_tokens: int


def corpus_ids(tokenizer_dir: Path, min_tokens: int = 200_000) -> list[int]:
    """Token ids of the standard library's docstrings (the embedded corpus), in a fixed order."""
    from lmjax.corpus.sources import read_documents
    from lmjax.text.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tokenizer_dir)
    ids: list[int] = []
    for doc in read_documents("stdlib"):
        ids += tokenizer.encode(doc)
        if len(ids) >= min_tokens:
            break
    return ids


def make_prompts(corpus: Sequence[int], tokenizer_dir: Path, count: int, seed: int) -> list[Prompt]:
    """`count` requests: prompt lengths and max_tokens drawn (seeded) from PROMPT_LENS and OUTPUT_LENS,
    prompts cut from `corpus` at seeded offsets."""
    from lmjax.text.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tokenizer_dir)
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        length, max_tokens = rng.choice(PROMPT_LENS), rng.choice(OUTPUT_LENS)
        start = rng.randrange(len(corpus) - length)
        ids = list(corpus[start:start + length])
        prompts.append(Prompt(ids, tokenizer.decode(ids), max_tokens))
    return prompts


# --- servers --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ServerSpec:
    """How to start one server and talk to it."""

    name: str
    command: list[str]  # with "{port}" where the port goes
    ready_path: str  # answers 200 once the model is loaded
    prompt_as_text: bool  # the server takes no token ids
    stream_usage: bool  # the server understands stream_options.include_usage
    levels: tuple[int, ...] | None = None  # the levels to run it at (None: all)


@dataclasses.dataclass(frozen=True)
class Target:
    """A running server: how to talk to it, its base URL and the model id it answers to."""

    spec: ServerSpec
    url: str
    model: str | None


def free_port() -> int:
    """A localhost TCP port that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""


@contextmanager
def running(spec: ServerSpec, log_dir: Path, ready_timeout: float) -> Iterator[Target]:
    """Starts the server in its own process group, yields it once it is ready, stops it after."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{spec.name}.log"
    command = [part.replace("{port}", str(port)) for part in spec.command]
    print(f"[{spec.name}] starting: {' '.join(command)}  (log: {log_path})", flush=True)
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=REPO)
    try:
        url = f"http://127.0.0.1:{port}"
        start = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{spec.name} exited with status {proc.returncode} before it was ready; "
                                   f"log tail:\n{_log_tail(log_path)}")
            if time.monotonic() - start > ready_timeout:
                raise RuntimeError(f"{spec.name} not ready after {ready_timeout:.0f} s; "
                                   f"log tail:\n{_log_tail(log_path)}")
            try:
                with urllib.request.urlopen(url + spec.ready_path, timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        print(f"[{spec.name}] ready after {time.monotonic() - start:.1f} s", flush=True)
        yield Target(spec, url, served_model(url))
    finally:
        stop_process_group(proc)


def served_model(url: str) -> str | None:
    """The first model id that GET /v1/models lists (servers may refuse requests naming another)."""
    try:
        with urllib.request.urlopen(url + "/v1/models", timeout=10) as response:
            return json.loads(response.read())["data"][0]["id"]
    except (urllib.error.URLError, OSError, KeyError, IndexError, ValueError):
        return None


def stop_process_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM to the server's process group (it was started in a new session), SIGKILL after `grace` s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# --- the load generator ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class RequestResult:
    """What one streamed request measured (times in seconds from sending it)."""

    ok: bool
    error: str = ""
    ttft: float = math.nan
    latency: float = math.nan
    tokens: int = 0
    gaps: list[float] = dataclasses.field(default_factory=list)


def request_body(target: Target, prompt: Prompt, max_tokens: int | None = None) -> dict[str, Any]:
    """A streamed greedy /v1/completions request for `prompt`."""
    body: dict[str, Any] = {"prompt": prompt.text if target.spec.prompt_as_text else prompt.ids,
                            "max_tokens": max_tokens or prompt.max_tokens, "temperature": 0.0, "stream": True}
    if target.model is not None:
        body["model"] = target.model
    if target.spec.stream_usage:
        body["stream_options"] = {"include_usage": True}
    return body


async def stream_completion(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> RequestResult:
    """Sends one streamed /v1/completions request and times its chunks. Output tokens: the usage the server
    reports at the end, else the number of chunks with text."""
    start = time.perf_counter()
    arrivals: list[float] = []
    usage_tokens = None
    try:
        async with session.post(url + "/v1/completions", json=body) as response:
            if response.status != 200:
                return RequestResult(False, f"HTTP {response.status}: {(await response.text())[:500]}")
            async for raw in response.content:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return RequestResult(False, f"error chunk: {data[:500]}")
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                if any(choice.get("text") for choice in chunk.get("choices") or []):
                    arrivals.append(time.perf_counter() - start)
    except (TimeoutError, aiohttp.ClientError, json.JSONDecodeError) as e:
        return RequestResult(False, f"{type(e).__name__}: {e}")
    latency = time.perf_counter() - start
    if not arrivals:
        return RequestResult(False, "no chunk with text before the stream ended")
    tokens = usage_tokens if usage_tokens is not None else len(arrivals)
    return RequestResult(True, ttft=arrivals[0], latency=latency, tokens=tokens,
                         gaps=[b - a for a, b in zip(arrivals, arrivals[1:], strict=False)])


@dataclasses.dataclass
class LevelStats:
    """One server at one concurrency level."""

    server: str
    clients: int
    requests: int
    errors: int
    tokens: int
    wall_s: float
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    tpot_p50_ms: float
    client_cpu: float  # CPU seconds of this process / wall seconds
    first_error: str = ""


def _percentile_ms(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1e3 if len(values) else math.nan


async def run_level(target: Target, prompts: Sequence[Prompt], clients: int) -> LevelStats:
    """`clients` closed-loop clients send `prompts` (each takes the next unsent one) until all are done."""
    queue: asyncio.Queue = asyncio.Queue()
    for prompt in prompts:
        queue.put_nowait(prompt)
    results: list[RequestResult] = []
    connector = aiohttp.TCPConnector(limit=clients + 4)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=900)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client() -> None:
            while not queue.empty():
                body = request_body(target, queue.get_nowait())
                results.append(await stream_completion(session, target.url, body))

        cpu, start = time.process_time(), time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    good = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in good)
    tpot = [(r.latency - r.ttft) / (r.tokens - 1) for r in good if r.tokens > 1]
    gaps = [g for r in good for g in r.gaps]
    ttft = [r.ttft for r in good]
    errors = [r.error for r in results if not r.ok]
    return LevelStats(target.spec.name, clients, len(results), len(errors), tokens, wall, tokens / wall,
                      _percentile_ms(ttft, 50), _percentile_ms(ttft, 99), _percentile_ms(gaps, 50),
                      _percentile_ms(gaps, 99), _percentile_ms(tpot, 50), cpu / wall, errors[0] if errors else "")


async def warm_up(target: Target, prompts: Sequence[Prompt]) -> None:
    """One short request per prompt length (compiles lmjax's prefill buckets), then four at once. Raises
    with the request and the response if any fails."""
    by_length = {len(p.ids): p for p in prompts}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as session:
        for prompt in [by_length[n] for n in sorted(by_length)]:
            await _checked(session, target.url, request_body(target, prompt, max_tokens=8))
        await asyncio.gather(*(_checked(session, target.url, request_body(target, p, max_tokens=8))
                               for p in prompts[:4]))


async def _checked(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> None:
    result = await stream_completion(session, url, body)
    if not result.ok:
        raise RuntimeError(f"warm-up request failed: {result.error}\nrequest: {json.dumps(body)[:800]}")


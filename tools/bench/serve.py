"""Serving benchmark: `lmjax serve` against a transformers `generate` server and llama.cpp, on the same weights.

    .venv/bin/python tools/bench/serve.py                      # all three servers, 1/4/16/64 clients
    .venv/bin/python tools/bench/serve.py --quick              # smoke run: 1 and 4 clients, 4 requests each
    .venv/bin/python tools/bench/serve.py --servers lmjax,hf --levels 1 16

What it builds (once, cached under --work, default /tmp/lmjax-serve-bench):

- tokenizer/: a SentencePiece tokenizer trained by `lmjax tokenizer train --source stdlib --vocab-size 4096`;
- hf/: a randomly initialised (seeded) `transformers.LlamaForCausalLM` of configs/tiny.py's shape, float32,
  saved with that tokenizer as `tokenizer.model` and a LlamaTokenizer config. The output rows of the control
  and byte-fallback pieces are zeroed: their logit is exactly 0 while the best of the ~3,800 others is well
  above, so greedy decoding never ends early and never emits partial UTF-8. Every request then yields
  exactly its `max_tokens` tokens on every server, each token a non-empty piece of text;
- run/: that checkpoint imported with `lmjax.interop.hf.load_hf_checkpoint` and written as an lmjax run
  directory (config.json, tokenizer/, an Orbax checkpoint); its logits are checked against transformers';
- model-f32.gguf: the same checkpoint converted by llama.cpp's `convert_hf_to_gguf.py` (from the
  llama-cpp-python sdist), when the llama.cpp venv (--llamacpp-python) exists.

What it runs: each server in turn as a subprocess on a free localhost port (logs in --work/logs/; lmjax
serve with --slots 64 and, like its peers, without a content filter unless --lmjax-content-filter),
warmed up with one short request per prompt length, then for each concurrency level a closed loop of that
many clients (aiohttp) sending streamed (`stream: true`) greedy `/v1/completions` requests back to back.
The request mix is seeded and the same for every server: prompts of 16/32/64/128 tokens cut from the
standard library's docstrings, `max_tokens` of 32/64/96/120. lmjax and the transformers server get the
prompt as token ids; llama-cpp-python's server takes text only, so it gets the decoded prompt.

What it prints, per server and level: requests, errors, output tokens, wall time, output tokens/s (all
output tokens / wall time of the level), TTFT p50/p99 (request sent -> first chunk with text), ITL p50/p99
(gaps between successive chunks with text), TPOT p50 ((latency - TTFT) / (tokens - 1) per request) and the
client's own CPU use (it shares the machine with the server). Then the ratios: lmjax at 16 clients vs lmjax
at 1, vs transformers at 16 and vs llama.cpp at 16 (or at the highest level run when 16 is not), and the
HTTP + scheduling overhead at batch 1: lmjax's ITL p50 at 1 client against the bare `Engine.step()` time
with one active request in an engine of the server's slot count, timed in this process before the lmjax
servers start and after they stop (the mean of the two; the host is noisy); and the same for an extra
`lmjax serve --slots 1` run at 1 client against a 1-slot engine (there the step is small, so the HTTP and
scheduling cost shows). Everything is also written to --work/results.json.
"""

import argparse
import asyncio
import dataclasses
import glob
import json
import math
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
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
VENV_BIN = REPO / ".venv" / "bin"
PROMPT_LENS = (16, 32, 64, 128)
OUTPUT_LENS = (32, 64, 96, 120)  # the longest prompt + reply (+ a BOS) fits tiny's 256-token context
FULL_LEVELS = (1, 4, 16, 64)
QUICK_LEVELS = (1, 4)
RATIO_LEVEL = 16
SERVERS = ("lmjax", "hf", "llamacpp")
LABELS = {"lmjax": "lmjax serve", "lmjax_1slot": "lmjax serve --slots 1 (batch-1 overhead run)",
          "hf": "transformers generate", "llamacpp": "llama.cpp (llama-cpp-python)"}
DEFAULT_LLAMACPP_PYTHON = Path.home() / ".cache/lmjax/llamacpp-venv/bin/python"
DEFAULT_CONVERTER_GLOB = str(Path.home() / ".cache/lmjax/sdist/llama_cpp_python-*/vendor/llama.cpp"
                             / "convert_hf_to_gguf.py")


# --- artefacts: tokenizer, HF checkpoint, lmjax run directory, GGUF -------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The benchmark model's shape (configs/tiny.py) and the seed of its random weights."""

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    d_ff: int
    seq_len: int
    norm_eps: float
    rope_theta: float
    seed: int

    @classmethod
    def from_tiny(cls, seed: int) -> "ModelSpec":
        from lmjax.config import load_config

        tiny = load_config(REPO / "configs" / "tiny.py")
        m = tiny.model
        return cls(vocab_size=tiny.tokenizer.vocab_size, d_model=m.d_model,
                   num_layers=m.num_layers, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads or m.num_heads,
                   head_dim=m.head_dim or m.d_model // m.num_heads, d_ff=m.d_ff, seq_len=m.seq_len,
                   norm_eps=m.norm_eps, rope_theta=m.rope_theta, seed=seed)


@dataclasses.dataclass(frozen=True)
class Artefacts:
    """Where the built tokenizer, HF checkpoint, lmjax run directory and GGUF (if any) are."""

    tokenizer_dir: Path
    hf_dir: Path
    run_dir: Path
    gguf: Path | None


def build_artefacts(work: Path, spec: ModelSpec, llamacpp_python: Path | None, converter: Path | None) -> Artefacts:
    """Creates (or reuses, when built for the same `spec`) everything the servers load."""
    stamp = work / "spec.json"
    wanted = json.dumps(dataclasses.asdict(spec), sort_keys=True)
    if stamp.is_file() and stamp.read_text() != wanted:
        print(f"[build] {work} was built for another model; rebuilding", flush=True)
        for name in ("tokenizer", "hf", "run", "model-f32.gguf"):
            target = work / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(wanted)
    tokenizer_dir = make_tokenizer(work / "tokenizer", spec)
    hf_dir = make_hf_checkpoint(work / "hf", tokenizer_dir, spec)
    run_dir = make_run_dir(work / "run", hf_dir, tokenizer_dir)
    gguf = None
    if llamacpp_python is not None and converter is not None:
        gguf = make_gguf(work / "model-f32.gguf", hf_dir, llamacpp_python, converter)
    return Artefacts(tokenizer_dir, hf_dir, run_dir, gguf)


def make_tokenizer(out: Path, spec: ModelSpec) -> Path:
    """The project's own tokenizer, trained by its CLI on the embedded stdlib corpus."""
    if not (out / "tokenizer.model").is_file():
        print("[build] training the tokenizer (lmjax tokenizer train)", flush=True)
        subprocess.run([str(VENV_BIN / "lmjax"), "tokenizer", "train", "--source", "stdlib",
                        "--vocab-size", str(spec.vocab_size), "--out", str(out)], check=True)
    return out


def non_text_ids(tokenizer_dir: Path) -> list[int]:
    """Ids of the pieces that are not plain text: control (pad, bos, eos, chat markers), unknown and byte pieces."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    return [i for i in range(sp.get_piece_size())
            if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i)]


def make_hf_checkpoint(out: Path, tokenizer_dir: Path, spec: ModelSpec) -> Path:
    """A seeded random LlamaForCausalLM (float32) with the tokenizer, as `save_pretrained` writes it."""
    if out.is_dir():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from lmjax.text.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID

    print(f"[build] random LlamaForCausalLM (seed {spec.seed}) -> {out}", flush=True)
    hf_logging.set_verbosity_error()
    torch.manual_seed(spec.seed)
    config = LlamaConfig(vocab_size=spec.vocab_size, hidden_size=spec.d_model, intermediate_size=spec.d_ff,
                         num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                         num_key_value_heads=spec.num_kv_heads, head_dim=spec.head_dim,
                         max_position_embeddings=spec.seq_len, rms_norm_eps=spec.norm_eps,
                         rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
                         bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                         tie_word_embeddings=False, torch_dtype="float32")
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight[non_text_ids(tokenizer_dir)] = 0.0
    model.generation_config.pad_token_id = PAD_ID
    partial = _fresh(out.with_name(out.name + ".partial"))
    model.save_pretrained(partial)
    shutil.copy(tokenizer_dir / "tokenizer.model", partial / "tokenizer.model")
    pieces = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    ids = {"unk_token": UNK_ID, "bos_token": BOS_ID, "eos_token": EOS_ID, "pad_token": PAD_ID}
    tokenizer_config = {
        "tokenizer_class": "LlamaTokenizer", **pieces, "add_bos_token": True, "add_eos_token": False,
        "add_prefix_space": False, "legacy": False, "model_max_length": spec.seq_len,
        "added_tokens_decoder": {str(ids[k]): {"content": v, "special": True, "lstrip": False, "rstrip": False,
                                               "normalized": False, "single_word": False} for k, v in pieces.items()},
    }
    (partial / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (partial / "special_tokens_map.json").write_text(json.dumps(pieces, indent=2))
    partial.rename(out)
    return out


def _fresh(path: Path) -> Path:
    """An empty directory at `path` (a leftover of an interrupted build is removed)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def make_run_dir(out: Path, hf_dir: Path, tokenizer_dir: Path) -> Path:
    """Imports the HF checkpoint into an lmjax run directory that `lmjax serve --workdir` loads, and checks
    that the restored model's logits match transformers'."""
    if out.is_dir():
        return out
    import jax

    from lmjax.config import base_config, validate
    from lmjax.interop.hf import load_hf_checkpoint
    from lmjax.run.checkpoint import Checkpointer
    from lmjax.run.workdir import Workdir
    from lmjax.text.tokenizer import Tokenizer

    print(f"[build] importing {hf_dir} into the lmjax run directory {out}", flush=True)
    model_cfg, params = load_hf_checkpoint(hf_dir, dtype="float32")
    tokenizer = Tokenizer.load(tokenizer_dir)
    cfg = base_config()
    cfg.model = model_cfg
    cfg.tokenizer.vocab_size = tokenizer.vocab_size
    validate(cfg)
    wd = Workdir(_fresh(out.with_name(out.name + ".partial")))
    wd.save_config(cfg)
    tokenizer.save(wd.tokenizer_dir)
    state = {"step": np.int32(0), "params": jax.device_put(params), "opt_state": {},
             "rng": jax.random.PRNGKey(0)}
    with Checkpointer(wd.checkpoint_dir) as ckpt:
        ckpt.save(state)
    check_logits(wd.path, hf_dir)
    wd.path.rename(out)
    return out


def check_logits(run_dir: Path, hf_dir: Path) -> None:
    """Compares the restored lmjax model's logits with transformers' on one prompt; raises if they differ."""
    import jax.numpy as jnp
    import torch
    from flax import nnx
    from transformers import LlamaForCausalLM

    from lmjax.run.restore import restore_model
    from lmjax.run.workdir import open_workdir

    cfg, graphdef, params, _, _ = restore_model(open_workdir(run_dir))
    ids = np.arange(8, 8 + 24, dtype=np.int32)[None] * 37 % cfg.model.vocab_size
    positions = jnp.arange(ids.shape[1], dtype=jnp.int32)[None]
    ours, _ = nnx.merge(graphdef, params)(jnp.asarray(ids), positions, jnp.ones_like(positions))
    ours = np.asarray(ours[0, :, :cfg.model.vocab_size], np.float32)
    with torch.no_grad():
        theirs = LlamaForCausalLM.from_pretrained(hf_dir).eval()(torch.from_numpy(ids.astype(np.int64))).logits[0]
    diff = float(np.abs(ours - theirs.numpy()).max())
    print(f"[build] lmjax vs transformers logits on a 24-token prompt: max |diff| {diff:.2e}", flush=True)
    if diff > 1e-3:
        raise RuntimeError(f"the imported run's logits differ from transformers' by {diff}")


def make_gguf(out: Path, hf_dir: Path, python: Path, converter: Path, outtype: str = "f32") -> Path:
    """The HF checkpoint as a GGUF of `outtype` (f32, f16, q8_0), written by llama.cpp's converter in the llama.cpp
    venv."""
    if out.is_file():
        return out
    print(f"[build] converting {hf_dir} to {out} with {converter}", flush=True)
    src = converter.parent
    env = {**os.environ, "PYTHONPATH": f"{src / 'gguf-py'}{os.pathsep}{src}"}
    partial = out.with_name(out.name + ".partial")
    done = subprocess.run([str(python), str(converter), str(hf_dir), "--outtype", outtype, "--outfile", str(partial)],
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed (status {done.returncode}):\n{done.stderr[-3000:]}")
    partial.rename(out)
    return out


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


def requests_for(clients: int, args: argparse.Namespace) -> int:
    """How many requests a level of `clients` clients sends."""
    return max(args.min_requests, clients * args.requests_per_client)


def bench_server(spec: ServerSpec, args: argparse.Namespace,
                 prompts_by_level: dict[int, list[Prompt]]) -> list[LevelStats]:
    """Starts the server, warms it up, runs every level, prints its table and stops it."""
    rows = []
    levels = {c: ps for c, ps in prompts_by_level.items() if spec.levels is None or c in spec.levels}
    with running(spec, args.work / "logs", args.ready_timeout) as target:
        asyncio.run(warm_up(target, [p for ps in levels.values() for p in ps]))
        for clients, prompts in levels.items():
            stats = asyncio.run(run_level(target, prompts, clients))
            rows.append(stats)
            print(f"[{spec.name}] {clients:>2} clients: {stats.tokens_per_s:7.1f} tok/s, "
                  f"TTFT p50 {stats.ttft_p50_ms:.0f} ms, ITL p50 {stats.itl_p50_ms:.1f} ms "
                  f"(load average after: {os.getloadavg()[0]:.2f})"
                  + (f", {stats.errors} errors (first: {stats.first_error})" if stats.errors else ""), flush=True)
    print_table(LABELS[spec.name], rows)
    return rows


# --- the bare engine step -------------------------------------------------------------------------------------


def bare_step_ms(run_dir: Path, slots: int, prompt: Sequence[int], steps: int = 60) -> float:
    """Median wall time of `Engine.step()` with one active request decoding in an engine of `slots` slots:
    the jitted decode over all slots plus the engine's own host work, no HTTP."""
    from lmjax.infer.engine import Engine
    from lmjax.run.restore import restore_model
    from lmjax.run.workdir import open_workdir

    cfg, graphdef, params, tokenizer, _ = restore_model(open_workdir(run_dir))
    engine = Engine(cfg.model, graphdef, params, num_slots=slots, end_ids=[tokenizer.eos_id])
    engine.generate_all([{"prompt_ids": list(prompt), "max_tokens": 8}])  # compiles prefill and decode
    engine.submit(list(prompt), max_tokens=steps + 2)
    engine.step()  # prefill and the first decode
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


# --- output ---------------------------------------------------------------------------------------------------


def print_table(title: str, rows: Sequence[LevelStats]) -> None:
    print(f"\n{title}")
    print(f"{'clients':>7} {'reqs':>5} {'errs':>4} {'out tok':>8} {'wall s':>7} {'out tok/s':>9} "
          f"{'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} {'TPOT p50':>9} {'client CPU':>10}")
    for r in rows:
        print(f"{r.clients:>7} {r.requests:>5} {r.errors:>4} {r.tokens:>8} {r.wall_s:>7.1f} {r.tokens_per_s:>9.1f} "
              f"{r.ttft_p50_ms:>7.0f}ms {r.ttft_p99_ms:>7.0f}ms {r.itl_p50_ms:>6.1f}ms {r.itl_p99_ms:>6.1f}ms "
              f"{r.tpot_p50_ms:>7.1f}ms {r.client_cpu:>9.0%}")
    print(flush=True)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b and not math.isnan(a) and not math.isnan(b) else "n/a"


def print_summary(results: dict[str, list[LevelStats]], ratio_level: int, bare_runs: dict[int, list[float]],
                  slots: int) -> dict[str, Any]:
    """Prints the ratios and the batch-1 overheads (`bare_runs`: the bare step times measured, by slot count);
    returns them."""
    def at(server: str, clients: int) -> LevelStats | None:
        return next((r for r in results.get(server, []) if r.clients == clients), None)

    summary: dict[str, Any] = {}
    print("Ratios (output tokens/s; TTFT p50 and ITL p50 as lmjax / other, lower is better for lmjax)")
    ours, ours_1 = at("lmjax", ratio_level), at("lmjax", 1)
    if ours and ours_1 and ratio_level != 1:
        summary[f"lmjax@{ratio_level}/lmjax@1 tok/s"] = ours.tokens_per_s / ours_1.tokens_per_s
        print(f"  lmjax {ratio_level} clients vs lmjax 1 client: tok/s "
              f"{_ratio(ours.tokens_per_s, ours_1.tokens_per_s)}")
    for peer in ("hf", "llamacpp"):
        theirs = at(peer, ratio_level)
        if ours is None or theirs is None:
            print(f"  lmjax vs {LABELS[peer]} at {ratio_level} clients: n/a (not both run)")
            continue
        summary[f"lmjax/{peer}@{ratio_level} tok/s"] = ours.tokens_per_s / theirs.tokens_per_s
        print(f"  lmjax vs {LABELS[peer]} at {ratio_level} clients: tok/s "
              f"{_ratio(ours.tokens_per_s, theirs.tokens_per_s)}, "
              f"TTFT p50 {_ratio(ours.ttft_p50_ms, theirs.ttft_p50_ms)}, "
              f"ITL p50 {_ratio(ours.itl_p50_ms, theirs.itl_p50_ms)}")
    measured = [(server, n) for server, n in (("lmjax", slots), ("lmjax_1slot", 1))
                if at(server, 1) is not None and bare_runs.get(n)]
    if measured:
        print("HTTP + scheduling overhead at batch 1: (ITL p50 at 1 client - bare Engine.step()) / bare step")
    for server, server_slots in measured:
        row = at(server, 1)
        bare = statistics.mean(bare_runs[server_slots])
        overhead = (row.itl_p50_ms - bare) / bare
        summary[f"overhead_{server_slots}_slots"] = {"itl_p50_ms": row.itl_p50_ms, "bare_step_ms": bare,
                                                     "bare_step_runs_ms": bare_runs[server_slots],
                                                     "overhead": overhead}
        runs = " / ".join(f"{t:.2f}" for t in bare_runs[server_slots])
        print(f"  {server_slots:>2} slots: ITL p50 {row.itl_p50_ms:6.2f} ms, bare step {bare:6.2f} ms "
              f"(mean of {runs}): overhead {overhead:+.0%} ({row.itl_p50_ms - bare:+.2f} ms per token)")
    return summary


# --- main -----------------------------------------------------------------------------------------------------


def server_specs(names: Sequence[str], artefacts: Artefacts, args: argparse.Namespace) -> list[ServerSpec]:
    """The servers to run, in `names` order; llama.cpp is skipped with a message when it is not available."""
    specs = []
    for name in names:
        if name == "lmjax":
            specs.append(lmjax_spec("lmjax", artefacts, args.slots, args.lmjax_content_filter))
            if 1 in args.levels and not args.no_overhead_run:
                specs.append(lmjax_spec("lmjax_1slot", artefacts, 1, args.lmjax_content_filter, levels=(1,)))
        elif name == "hf":
            specs.append(ServerSpec("hf", [sys.executable, str(Path(__file__).with_name("hf_server.py")), "--model",
                                           str(artefacts.hf_dir), "--port", "{port}", "--threads", str(args.threads)],
                                    "/health", prompt_as_text=False, stream_usage=True))
        elif artefacts.gguf is None:
            print(f"[llamacpp] skipped: no llama.cpp venv at {args.llamacpp_python} or no converter "
                  f"matching {args.llamacpp_converter} (see the --llamacpp-* flags)", flush=True)
        else:
            specs.append(ServerSpec("llamacpp", [str(args.llamacpp_python), "-m", "llama_cpp.server", "--model",
                                                 str(artefacts.gguf), "--host", "127.0.0.1", "--port", "{port}",
                                                 "--n_ctx", str(2 * artefacts_context(artefacts)),
                                                 "--n_threads", str(args.threads),
                                                 "--n_threads_batch", str(args.threads),
                                                 "--interrupt_requests", "False"],
                                    "/v1/models", prompt_as_text=True, stream_usage=False))
    return specs


def lmjax_spec(name: str, artefacts: Artefacts, slots: int, content_filter: bool,
               levels: tuple[int, ...] | None = None) -> ServerSpec:
    """`lmjax serve` on the run directory with `slots` KV-cache rows."""
    command = [str(VENV_BIN / "lmjax"), "serve", "--workdir", str(artefacts.run_dir), "--port", "{port}",
               "--slots", str(slots)]
    if not content_filter:
        command.append("--no-content-filter")
    return ServerSpec(name, command, "/health", prompt_as_text=False, stream_usage=True, levels=levels)


def artefacts_context(artefacts: Artefacts) -> int:
    """The model's context length (its max_position_embeddings)."""
    return json.loads((artefacts.hf_dir / "config.json").read_text())["max_position_embeddings"]


def find_converter(pattern: str) -> Path | None:
    """The last path matching the glob `pattern` (~ expanded), or None."""
    matches = sorted(glob.glob(os.path.expanduser(pattern)))
    return Path(matches[-1]) if matches else None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--servers", default=",".join(SERVERS), help=f"comma-separated subset of {','.join(SERVERS)}")
    p.add_argument("--levels", type=int, nargs="+", help=f"concurrent clients (default {FULL_LEVELS})")
    p.add_argument("--quick", action="store_true", help=f"smoke run: levels {QUICK_LEVELS}, 4 requests each")
    p.add_argument("--requests-per-client", type=int, default=2, help="requests per level = max(this x clients, "
                                                                       "--min-requests)")
    p.add_argument("--min-requests", type=int, default=16)
    p.add_argument("--slots", type=int, default=64, help="lmjax serve --slots")
    p.add_argument("--lmjax-content-filter", action="store_true",
                   help="keep lmjax serve's blocklist filter on (off by default: the peers have none)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of torch and llama.cpp")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and of the request mix")
    p.add_argument("--work", type=Path, default=Path("/tmp/lmjax-serve-bench"), help="cache of built artefacts")
    p.add_argument("--llamacpp-python", type=Path, default=DEFAULT_LLAMACPP_PYTHON,
                   help="python of the venv with llama-cpp-python[server] and the converter's deps")
    p.add_argument("--llamacpp-converter", default=DEFAULT_CONVERTER_GLOB,
                   help="convert_hf_to_gguf.py of llama.cpp (a glob; the last match is used)")
    p.add_argument("--ready-timeout", type=float, default=600, help="seconds to wait for a server to load")
    p.add_argument("--no-bare-step", action="store_true", help="skip timing the bare Engine.step()")
    p.add_argument("--no-overhead-run", action="store_true",
                   help="skip the extra `lmjax serve --slots 1` run at 1 client")
    args = p.parse_args(argv)
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = sorted(set(args.servers) - set(SERVERS))
    if unknown:
        p.error(f"unknown server(s) {unknown}; choose from {SERVERS}")
    if args.quick:
        args.levels = args.levels or list(QUICK_LEVELS)
        args.requests_per_client, args.min_requests = 1, 4
    args.levels = sorted(set(args.levels or FULL_LEVELS))
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    spec = ModelSpec.from_tiny(args.seed)
    llamacpp_python, converter = args.llamacpp_python, find_converter(args.llamacpp_converter)
    want_llamacpp = "llamacpp" in args.servers and llamacpp_python.is_file() and converter is not None
    artefacts = build_artefacts(args.work, spec, llamacpp_python if want_llamacpp else None,
                                converter if want_llamacpp else None)
    corpus = corpus_ids(artefacts.tokenizer_dir)
    prompts_by_level = {c: make_prompts(corpus, artefacts.tokenizer_dir, requests_for(c, args), args.seed + c)
                        for c in args.levels}
    print(f"model: {spec}\nlevels: {args.levels} clients; requests per level: "
          f"{[len(p) for p in prompts_by_level.values()]}; load average {os.getloadavg()[0]:.2f} "
          f"(the servers and this client share the machine: quote runs made when it is otherwise idle)", flush=True)

    specs = server_specs(args.servers, artefacts, args)
    measure_bare = "lmjax" in args.servers and 1 in args.levels and not args.no_bare_step
    bare_runs: dict[int, list[float]] = {slots: [] for slots in sorted({args.slots, 1}, reverse=True)}

    def time_bare_steps(when: str) -> None:
        for slots, times in bare_runs.items():
            times.append(bare_step_ms(artefacts.run_dir, slots, prompts_by_level[1][0].ids))
            print(f"bare Engine.step() with 1 active request in {slots} slots, {when} the lmjax servers: "
                  f"{times[-1]:.2f} ms (median)", flush=True)

    results: dict[str, list[LevelStats]] = {}

    def run_servers(group: Sequence[ServerSpec]) -> None:
        for server in group:
            try:
                results[server.name] = bench_server(server, args, prompts_by_level)
            except RuntimeError as e:
                print(f"[{server.name}] FAILED: {e}", flush=True)

    if measure_bare:
        time_bare_steps("before")
    run_servers([spec for spec in specs if spec.name.startswith("lmjax")])
    if measure_bare:
        time_bare_steps("after")
    run_servers([spec for spec in specs if not spec.name.startswith("lmjax")])
    print(f"\n=== summary (load average now {os.getloadavg()[0]:.2f}) ===")
    for name, rows in results.items():
        print_table(LABELS[name], rows)
    ratio_level = RATIO_LEVEL if RATIO_LEVEL in args.levels else max(args.levels)
    summary = print_summary(results, ratio_level, bare_runs, args.slots)
    out = args.work / "results.json"
    out.write_text(json.dumps({"model": dataclasses.asdict(spec), "levels": args.levels, "summary": summary,
                               "results": {k: [dataclasses.asdict(r) for r in v] for k, v in results.items()}},
                              indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()

"""Shared fixtures: a tiny config, one tokenizer and one trained run reused by the end-to-end tests."""

import os
import shutil
from pathlib import Path

import jax
import pytest
from ml_collections import ConfigDict

from lmjax.config import apply_overrides, base_config

# Caches kept between test runs in the checkout (git-ignored), never in the user's ~/.cache.
CACHE_DIR = Path(__file__).resolve().parents[1] / ".pytest-cache-lmjax"
# XLA executables: every train() call compiles its steps afresh (new jitted functions), mostly the same tiny
# programs, so JAX's persistent cache compiles each once per checkout. For the pytest process; processes that
# tests start get it from `xla_cache_env()`, or from train.compile_cache, which picks the same directory under
# $LMJAX_CACHE_DIR. JAX's own size bound rescans the directory at every write (a cold run took a third
# longer), so the cache is cleared instead when it outgrows XLA_CACHE_MAX_BYTES.
XLA_CACHE = {"jax_compilation_cache_dir": str(CACHE_DIR / "jax-compile"),
             "jax_persistent_cache_min_compile_time_secs": 0}
XLA_CACHE_MAX_BYTES = 2**30


def pytest_configure(config):
    """Points lmjax's corpus caches (the stdlib documents take ~17 s to build) and XLA's at `CACHE_DIR`; the
    processes that tests start inherit the first."""
    os.environ["LMJAX_CACHE_DIR"] = str(CACHE_DIR)
    xla_dir = Path(XLA_CACHE["jax_compilation_cache_dir"])
    if xla_dir.is_dir() and sum(p.stat().st_size for p in xla_dir.iterdir()) > XLA_CACHE_MAX_BYTES:
        shutil.rmtree(xla_dir)
    for name, value in XLA_CACHE.items():
        jax.config.update(name, value)


def xla_cache_env() -> dict[str, str]:
    """This process's environment plus the variables that give a JAX process `XLA_CACHE`."""
    return {**os.environ, **{name.upper(): str(value) for name, value in XLA_CACHE.items()}}


# A model small enough to train tens of steps in seconds on one CPU core; also usable on the command
# line as `--config.KEY=VALUE` arguments.
TINY_OVERRIDES = [
    "model.family=llama", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "model.d_model=64",
    "model.d_ff=128", "model.seq_len=64", "model.dtype=float32", "tokenizer.vocab_size=512",
    "train.steps=24", "train.batch_size=8", "train.lr=3e-3", "train.warmup_steps=4", "train.log_every=4",
    "train.eval_every=12", "train.eval_steps=2", "train.ckpt_every=8", "train.peak_tflops=1.0",
    "train.samples=The",
    # the settings of base_config where configs/tiny.py chooses otherwise, so tests that start from either agree
    "model.mlp=", "model.zero_init_out=False", "train.optimizer=adamw", "train.decay=cosine",
]

_session: dict = {}


@pytest.fixture(scope="session", autouse=True)
def _session_tmp(tmp_path_factory):
    """Lets `tiny_overrides` put the shared tokenizer in this session's temporary directory."""
    _session["tmp"] = tmp_path_factory
    yield
    _session.clear()


def shared_tokenizer_dir() -> Path | None:
    """The tokenizer that a run of `TINY_OVERRIDES` would train (on its data.train, 512 tokens), trained on
    first use and then shared by the whole test session; None outside pytest."""
    if "tokenizer" not in _session and "tmp" in _session:
        from lmjax.input import specs
        from lmjax.text.tokenizer import train_tokenizer

        cfg = apply_overrides(base_config(), TINY_OVERRIDES)
        out = _session["tmp"].mktemp("tokenizer")
        train_tokenizer(specs.texts(cfg.data.train), cfg.tokenizer.vocab_size, out, kind=cfg.tokenizer.kind)
        _session["tokenizer"] = out
    return _session.get("tokenizer")


def tiny_overrides() -> list[str]:
    """`TINY_OVERRIDES` with `tokenizer.path` set to the shared tokenizer, so that runs skip training one."""
    shared = shared_tokenizer_dir()
    return TINY_OVERRIDES + ([f"tokenizer.path={shared}"] if shared else [])


def tiny_config(*overrides: str) -> ConfigDict:
    """`tiny_overrides()` on the defaults, then `overrides` (`tokenizer.path=` trains the run's own)."""
    return apply_overrides(base_config(), tiny_overrides() + list(overrides))


@pytest.fixture(scope="session")
def shared_tokenizer():
    """The session's shared tokenizer (see `shared_tokenizer_dir`), loaded."""
    from lmjax.text.tokenizer import Tokenizer

    return Tokenizer.load(shared_tokenizer_dir())


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """(workdir, result) of a 24-step run of `tiny_config` on the stdlib corpus."""
    from lmjax.train.loop import train

    workdir = tmp_path_factory.mktemp("runs") / "tiny"
    result = train(tiny_config(), workdir)
    return workdir, result


API_KEYS = {  # name -> (key, requests per minute, tokens per minute) of the session's API server
    "alice": ("sk-test-alice-0123456789", None, None),
    "bob": ("sk-test-bob-0123456789ab", 3, None),
    "carol": ("sk-test-carol-0123456789", None, 40),
}


class LiveServer:
    """An ASGI app served by uvicorn on a free loopback port, in a thread of the test process."""

    def __init__(self, app):
        import socket
        import threading

        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                     access_log=False, lifespan="on"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float = 300) -> "LiveServer":
        import time

        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.url} did not become ready")

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)


@pytest.fixture(scope="session")
def chat_engine(trained_run):
    """One engine (8 slots) on the trained run, shared by every server of the session."""
    from lmjax.serve.engine import ChatEngine

    engine = ChatEngine.from_workdir(trained_run[0], num_slots=8)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def api_server(chat_engine, trained_run):
    """(LiveServer, Api) of the trained run with `API_KEYS`, the content filter and the feedback store."""
    from lmjax.serve.api import Api, ServeSettings
    from lmjax.serve.auth import ApiKey
    from lmjax.serve.feedback import FeedbackStore
    from lmjax.serve.safety import ContentFilter
    from lmjax.text.blocklist import Blocklist

    keys = [ApiKey(name, key, rpm, tpm) for name, (key, rpm, tpm) in API_KEYS.items()]
    feedback = FeedbackStore.for_workdir(trained_run[0])
    settings = ServeSettings(model_name="tiny", keys=keys, max_body_bytes=64 * 1024, request_timeout=120)
    api = Api(chat_engine, settings, feedback, ContentFilter(Blocklist.default(), feedback))
    server = LiveServer(api.app).wait_ready()
    yield server, api
    server.stop()

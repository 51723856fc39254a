"""Data pipeline speed: `prepare` end to end, and the training input pipeline against the train step.

    .venv/bin/python tools/bench/data_throughput.py                        # stdlib prepare + input vs step
    .venv/bin/python tools/bench/data_throughput.py --corpus /tmp/corpus_1g # also prepare a big local corpus

Make a big messy corpus first with `python tools/make_corpus.py --out /tmp/corpus_1g --size-gb 1`.
Prints seconds, docs/s, the peak memory of the main and worker processes, and the ratio of tokens/s the
input pipeline delivers to tokens/s the `tiny` train step consumes.
"""

import argparse
import functools
import resource
import shutil
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from lmjax.config import load_config
from lmjax.corpus.prepare import prepare, prepare_config
from lmjax.corpus.sources import read_documents
from lmjax.input.chunks import tokenize_documents
from lmjax.input.packing import train_iterator
from lmjax.model.params import abstract_model
from lmjax.text.tokenizer import Tokenizer
from lmjax.train.optim import make_optimizer
from lmjax.train.step import init_state, train_step


def peak_rss_mb() -> tuple[float, float]:
    """Peak resident memory (MB) of this process and of its largest finished child (the workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, children


def bench_prepare(sources: str, workers: int) -> tuple[dict, float]:
    cfg = prepare_config()
    cfg.update(sources=sources, workers=workers)
    out = Path(tempfile.mkdtemp(prefix="lmjax-prepare-"))
    start = time.perf_counter()
    card = prepare(cfg, out, log=lambda _: None)
    seconds = time.perf_counter() - start
    shutil.rmtree(out)
    return card, seconds


def input_tokens_per_sec(tokenizer: Tokenizer, seq_len: int, batch: int, steps: int = 200) -> float:
    chunks = tokenize_documents(read_documents("stdlib"), tokenizer, seq_len)
    it = train_iterator(chunks, seq_len, batch, seed=0)
    next(it)
    start = time.perf_counter()
    for _ in range(steps):
        next(it)
    return steps * batch * seq_len / (time.perf_counter() - start)


def step_tokens_per_sec(vocab: int, steps: int = 5) -> tuple[float, int, int]:
    cfg = load_config("configs/tiny.py")
    cfg.model.vocab_size = vocab
    graphdef, _, _ = abstract_model(cfg.model)
    tx = make_optimizer(cfg.train)
    state = jax.jit(functools.partial(init_state, cfg.model, tx, 0))()
    step = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, dropout=False), donate_argnums=0)
    b, length = cfg.train.batch_size, cfg.model.seq_len
    tokens = np.random.default_rng(0).integers(0, vocab, (1, b, length)).astype(np.int32)
    batch = {"inputs": tokens, "targets": tokens, "segment_ids": np.ones_like(tokens),
             "positions": np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape).copy()}
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return b * length / float(np.median(times)), b, length


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="", help="tools/make_corpus.py output; its JSONL part is prepared too")
    parser.add_argument("--workers", type=int, default=2, help="cleaning processes")
    args = parser.parse_args()

    rows = []
    card, seconds = bench_prepare("stdlib:all", args.workers)
    rows.append(("prepare stdlib:all", card["documents_in"], seconds, card["bytes_in"]))
    if args.corpus:
        spec = f"jsonl:{args.corpus}/jsonl/*.jsonl"
        big, big_seconds = bench_prepare(spec, args.workers)
        rows.append((f"prepare {args.corpus}", big["documents_in"], big_seconds, big["bytes_in"]))
    own, children = peak_rss_mb()
    print(f"{'job':<34} {'documents':>10} {'seconds':>8} {'docs/s':>9} {'MB/s':>6}")
    for name, docs, secs, nbytes in rows:
        print(f"{name:<34} {docs:>10,} {secs:>8.1f} {docs / secs:>9,.0f} {nbytes / secs / 1e6:>6.1f}")
    print(f"peak memory: main process {own:,.0f} MB, largest worker {children:,.0f} MB")

    with tempfile.TemporaryDirectory() as tmp:
        from lmjax.text.tokenizer import train_tokenizer

        tokenizer = train_tokenizer(read_documents("stdlib"), 4096, tmp)
    step_tps, b, length = step_tokens_per_sec(tokenizer.vocab_size)
    input_tps = input_tokens_per_sec(tokenizer, length, b)
    print(f"input pipeline (read, pack, batch {b}x{length}): {input_tps:,.0f} tokens/s")
    print(f"tiny train step:                                {step_tps:,.0f} tokens/s")
    print(f"ratio input / step: {input_tps / step_tps:.1f}x")


if __name__ == "__main__":
    main()

"""Input pipeline at scale: `lmjax train` start-up time and memory against corpus size, token shards vs the
in-memory path of an earlier commit, and the input pipeline's tokens/s against the train step's.

    python tools/make_corpus.py --out /tmp/corpus_10m --size-gb 0.01
    python tools/make_corpus.py --out /tmp/corpus_100m --size-gb 0.1
    .venv/bin/python tools/bench/input_scale.py --corpus /tmp/corpus_10m /tmp/corpus_100m [--baseline REV] \
        [--real-text-mb 200]

For each corpus: tokenizes it into token shards (`lmjax data tokenize`, tokens/s), then runs a 2-step
`lmjax train` of a tiny model from the shards and (with --baseline) the same run from the raw source with
the code of commit REV (a `git worktree`), which tokenizes the whole corpus in memory at every start. Each
run's time from process start to its first logged step and its peak RSS (wait4) are printed as one JSON line.
With --real-text-mb, tokenizing is also timed on that much real text that never repeats (`tokenize_real_text`).
"""

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
TINY = ["model.family=llama", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "model.d_model=64",
        "model.d_ff=128", "model.seq_len=256", "model.dtype=float32", "train.steps=2", "train.batch_size=8",
        "train.log_every=1", "train.eval_every=0", "train.eval_steps=1", "train.ckpt_every=1000",
        "train.samples=", "train.peak_tflops=1.0"]


def corpus_spec(corpus: Path) -> str:
    """The corpus's JSONL parts (make_corpus.py's bulk) as a raw data spec."""
    return f"jsonl:{corpus}/**/*.jsonl"


def run_timed(cmd: list[str], env: dict, marker: str, cwd: Path = REPO) -> dict:
    """Runs `cmd` in `cwd` (whose `lmjax` package `python -m` imports first); seconds until a line of its output
    contains `marker`, total seconds, peak RSS (MB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
    first, lines = None, []
    for line in proc.stdout:
        lines.append(line)
        if first is None and marker in line:
            first = time.perf_counter() - start
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{''.join(lines[-30:])}")
    return {"first_step_s": None if first is None else round(first, 2),
            "total_s": round(time.perf_counter() - start, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def lmjax(*args: str) -> list[str]:
    return [PYTHON, "-m", "lmjax.cli", *args]


def train_cmd(workdir: Path, train: str, val: str, tokenizer: Path) -> list[str]:
    return lmjax("train", "--config", "configs/tiny.py", "--workdir", str(workdir), *(f"--config.{o}" for o in TINY),
                 f"--config.data.train={train}", f"--config.data.val={val}", f"--config.tokenizer.path={tokenizer}")


def input_vs_step(shards: Path, tokenizer_dir: Path, steps: int = 200) -> dict:
    """Tokens/s of the input pipeline (packed batches read from the shards) vs of the `tiny` train step
    (tools/bench/data_throughput.py measures the step)."""
    sys.path.insert(0, str(REPO / "tools" / "bench"))
    from data_throughput import step_tokens_per_sec

    from lmjax.input.packing import train_iterator
    from lmjax.input.specs import open_chunks
    from lmjax.text.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tokenizer_dir)
    step_rate, batch, seq_len = step_tokens_per_sec(tokenizer.vocab_size)
    chunks = open_chunks(str(shards), tokenizer, seq_len) if (shards / "manifest.json").is_file() else None
    if chunks is None or chunks.seq_len != seq_len:
        return {"skipped": f"the shards are not cut for configs/tiny.py's seq_len {seq_len}"}
    it = train_iterator(chunks, seq_len, batch, seed=0)
    next(it)
    start = time.perf_counter()
    for _ in range(steps):
        next(it)
    input_rate = steps * batch * seq_len / (time.perf_counter() - start)
    return {"input_tokens_per_s": round(input_rate), "step_tokens_per_s": round(step_rate),
            "input_over_step": round(input_rate / step_rate, 1)}


def real_documents(megabytes: float) -> Iterator[str]:
    """About `megabytes` of real text, none of it repeated: the embedded stdlib corpus (docstrings and prose),
    then the Python source files of the installed packages (code, comments, docstrings; sorted by path)."""
    from lmjax.corpus.stdlib_docs import stdlib_documents

    budget = megabytes * 1e6
    files = sorted(Path(sysconfig.get_paths()["purelib"]).rglob("*.py"))
    for doc in itertools.chain(stdlib_documents(), (f.read_text(errors="replace") for f in files)):
        if budget <= 0:
            return
        budget -= len(doc.encode())
        yield doc


def tokenize_real_text(tmp: Path, env: dict, megabytes: float, workers: int) -> dict:
    """`lmjax data tokenize` tokens/s on ~`megabytes` of real text that never repeats (`real_documents`; one
    JSONL line per document, as web corpora come), with a 4096-token BPE trained on the stdlib corpus. The
    generated corpora have a vocabulary of ~4000 made-up words, so a BPE of 4096 makes almost every word one
    token (~6.6 characters per token, against ~3.8 on real text) and every word is a known one after the first
    few documents; real text has new words all along (identifiers, numbers, names)."""
    from lmjax.corpus.stdlib_docs import stdlib_documents
    from lmjax.text.io import write_jsonl
    from lmjax.text.tokenizer import train_tokenizer

    tokenizer = tmp / "tokenizer-stdlib"
    train_tokenizer(stdlib_documents(), 4096, tokenizer)
    text = tmp / "real-text.jsonl"
    docs = list(real_documents(megabytes))
    chars = sum(map(len, docs))
    write_jsonl(({"text": d} for d in docs), text)
    out = tmp / "shards-real-text"
    run = run_timed(lmjax("data", "tokenize", "--source", f"jsonl:{text}", "--tokenizer", str(tokenizer), "--out",
                          str(out), "--seq-len", "256", "--workers", str(workers)), env, "tokenized")
    manifest = json.loads((out / "manifest.json").read_text())
    tokens = manifest["splits"]["train"]["tokens"]
    return {"real_text_mb": round(text.stat().st_size / 1e6, 1), "documents": len(docs), "tokens": tokens,
            "chars_per_token": round(chars / tokens, 2), "tokenize": {
                **run, "tokens_per_s_in_writer": round(tokens / manifest["seconds"])}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, nargs="+", required=True, help="make_corpus.py outputs")
    parser.add_argument("--baseline", default="", help="commit whose in-memory pipeline to compare (git worktree)")
    parser.add_argument("--workers", type=int, default=2, help="tokenizing processes")
    parser.add_argument("--real-text-mb", type=float, default=0, help="also tokenize this much real text (0: no)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lmjax-input-scale-"))
    env = {**os.environ, "LMJAX_CACHE_DIR": str(tmp / "cache"), "JAX_PLATFORMS": "cpu"}
    base = tmp / "base" if args.baseline else None  # the baseline's checkout: its runs start there
    if base:
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.baseline], cwd=REPO, check=True,
                       capture_output=True)
    tokenizer = tmp / "tokenizer"
    val = tmp / "val.txt"
    from lmjax.corpus.sources import read_documents
    from lmjax.text.tokenizer import train_tokenizer

    sample = [d for _, d in zip(range(20000), read_documents(corpus_spec(args.corpus[0])), strict=False)]
    train_tokenizer(sample, 4096, tokenizer)
    val.write_text("\n\n".join(sample[-200:]))
    try:
        for corpus in args.corpus:
            size_mb = sum(p.stat().st_size for p in corpus.rglob("*.jsonl")) / 1e6
            shards = tmp / f"shards-{corpus.name}"
            tokenize = lmjax("data", "tokenize", "--source", corpus_spec(corpus), "--tokenizer", str(tokenizer),
                             "--out", str(shards), "--seq-len", "256", "--workers", str(args.workers))
            tok_run = run_timed(tokenize, env, "tokenized")
            manifest = json.loads((shards / "manifest.json").read_text())
            tokens = manifest["splits"]["train"]["tokens"]
            chars = sum(len(d) for d in read_documents(corpus_spec(corpus))) if args.real_text_mb else None
            result = {"corpus": str(corpus), "jsonl_mb": round(size_mb, 1), "tokens": tokens,
                      "chars_per_token": chars and round(chars / tokens, 2),
                      "tokenize": {**tok_run, "tokens_per_s_in_writer": round(tokens / manifest["seconds"])},
                      "train_from_shards": run_timed(train_cmd(tmp / f"run-{corpus.name}", str(shards), f"text:{val}",
                                                               tokenizer), env, " | loss ")}
            if base:
                result["train_in_memory_baseline"] = run_timed(
                    train_cmd(tmp / f"base-{corpus.name}", corpus_spec(corpus), f"text:{val}", tokenizer),
                    env, " | loss ", cwd=base)
            print(json.dumps(result), flush=True)
        print(json.dumps(input_vs_step(shards, tokenizer)), flush=True)
        if args.real_text_mb:
            print(json.dumps(tokenize_real_text(tmp, env, args.real_text_mb, args.workers)), flush=True)
    finally:
        if base:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=REPO, check=False)
        print(f"own peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB; outputs in {tmp}",
              file=sys.stderr)


if __name__ == "__main__":
    main()

"""Language-model evaluation: loss, perplexity and bits per byte.

Training's validation on packed chunks (lmjax/train/objectives.py) and `lmjax eval lm` (`evaluate_source`)
share `eval_step` (one batch -> sums of loss, counted tokens and their bytes) and `metrics_from_sums`.

`lmjax eval lm` scores whole documents with a sliding window. A document is [bos] + ids + [eos]; a
conversation is its chat-template tokens, of which only the assistant's count (the template's loss mask).
Every token but the first is predicted exactly once. With C the model's context (seq_len) and S the stride,
the first window holds tokens 0..C and scores all its C targets; each next window starts S tokens later and
scores only the targets no window scored yet (its last S), so each of them is predicted from at least C - S
tokens of left context. S = C cuts documents into non-overlapping chunks, as training does
(lmjax/input/chunks.py); the default S = C / 2 costs about twice the compute for more context.
Windows shorter than C (short documents, the last window of a long one) share rows of C tokens as separate
segments (attention does not cross them), and rows go into batches of B rows padded with empty rows: every
batch is [B, C], so the jitted step compiles once.
"""

import functools
import math
import time
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from lmjax.config import ConfigError, DataError, LmjaxError
from lmjax.eval.baselines import target_counts, unigram_bpb_from_counts
from lmjax.input.packing import deal_rows
from lmjax.input.specs import load_sequences, open_chunks
from lmjax.model.loss import Batch, loss_weights, token_losses
from lmjax.model.params import Params
from lmjax.run.restore import restore_model
from lmjax.run.workdir import open_workdir
from lmjax.text.tokenizer import Tokenizer

SUMS = ("loss_sum", "tokens", "bytes")
ROW_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def eval_step(params: Params, batch: Batch, token_bytes: jax.Array, *,
              graphdef: nnx.GraphDef) -> dict[str, jax.Array]:
    """Sums over one batch: loss (nats), counted tokens and the UTF-8 bytes those tokens decode to
    (for bits per byte, which does not depend on the tokenizer)."""
    weights = loss_weights(batch)
    losses = token_losses(params, graphdef, batch)
    return {
        "loss_sum": (losses * weights).sum(),
        "tokens": weights.sum(),
        "bytes": (token_bytes[batch["targets"]] * weights).sum(),
    }


def jit_eval_step(graphdef: nnx.GraphDef, in_shardings: tuple | None = None) -> Callable:
    """`eval_step` jitted as (params, batch, token_bytes) -> sums; `in_shardings` lays its arguments out on a mesh."""
    step = functools.partial(eval_step, graphdef=graphdef)
    return jax.jit(step, in_shardings=in_shardings) if in_shardings else jax.jit(step)


def batch_sums(eval_fn: Callable, params: Params, batches: Iterable[Batch], token_bytes: jax.Array) -> dict[str, float]:
    """`eval_fn`'s sums over `batches`, added up on the host in float64 (the steps are dispatched first)."""
    outs = jax.device_get([eval_fn(params, batch, token_bytes) for batch in batches])
    return {k: math.fsum(float(out[k]) for out in outs) for k in SUMS}


def metrics_from_sums(sums: dict[str, float]) -> dict[str, float]:
    """loss (nats per counted token), ppl (exp of it, capped at exp(50)), bpb (bits per UTF-8 byte of the
    counted tokens: loss_sum / ln 2 / bytes), tokens and bytes."""
    loss = sums["loss_sum"] / max(sums["tokens"], 1)
    bpb = sums["loss_sum"] / math.log(2) / max(sums["bytes"], 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "bpb": bpb, "tokens": int(sums["tokens"]),
            "bytes": int(sums["bytes"])}


def lm_metrics(eval_fn: Callable, params: Params, batches: Iterable[Batch], token_bytes: jax.Array) -> dict[str, float]:
    """Training's validation numbers over `batches`: val_loss, val_ppl and val_bpb of `metrics_from_sums`."""
    metrics = metrics_from_sums(batch_sums(eval_fn, params, batches, token_bytes))
    return {f"val_{k}": metrics[k] for k in ("loss", "ppl", "bpb")}


def windows(sequence: np.ndarray, context: int, stride: int) -> list[dict[str, np.ndarray]]:
    """The sliding windows of one token sequence ([n], or [2, n]: tokens and loss mask) as the module
    docstring says: inputs, targets and weights (1 where this window scores the target), each [<= context].
    Simplification: the last window is not shifted left to end at the document's end (as some evaluations do
    for more context); it is simply shorter."""
    tokens, mask = (sequence, None) if sequence.ndim == 1 else (sequence[0], sequence[1])
    n_targets = len(tokens) - 1
    out, scored, start = [], 0, 0
    while scored < n_targets:
        end = min(start + context, n_targets)
        weights = (np.arange(start, end) >= scored).astype(np.int32)
        if mask is not None:
            weights *= mask[start + 1 : end + 1]
        out.append({"inputs": tokens[start:end], "targets": tokens[start + 1 : end + 1], "weights": weights})
        scored, start = end, start + stride
    return out


def _row(segments: list[dict[str, np.ndarray]], context: int) -> dict[str, np.ndarray]:
    row = {k: np.zeros(context, np.int32) for k in ROW_KEYS}
    at = 0
    for segment_id, window in enumerate(segments, 1):
        span = slice(at, at + len(window["inputs"]))
        row["inputs"][span], row["targets"][span] = window["inputs"], window["targets"]
        row["loss_mask"][span], row["segment_ids"][span] = window["weights"], segment_id
        row["positions"][span] = np.arange(span.stop - span.start)
        at = span.stop
    return row


def pack_windows(wins: Iterable[dict[str, np.ndarray]], context: int) -> list[dict[str, np.ndarray]]:
    """Rows of `context` tokens (a packed batch's rows: lmjax/input/packing.py, `loss_mask` holding the
    windows' weights) with consecutive windows side by side while they fit (next fit), zero-padded."""
    rows, current, used = [], [], 0
    for window in wins:
        if used + len(window["inputs"]) > context:
            rows.append(_row(current, context))
            current, used = [], 0
        current.append(window)
        used += len(window["inputs"])
    return rows + ([_row(current, context)] if current else [])


def score_sequences(params: Params, graphdef: nnx.GraphDef, sequences: list[np.ndarray], token_bytes: np.ndarray,
                    context: int, stride: int, batch_size: int) -> dict[str, float]:
    """`metrics_from_sums` of token sequences scored whole by sliding windows, plus the number of windows."""
    wins = [w for sequence in sequences for w in windows(sequence, context, stride)]
    if not wins:
        raise DataError("nothing to score: the source's documents have no tokens to predict")
    batches = deal_rows(pack_windows(wins, context), batch_size)
    sums = batch_sums(jit_eval_step(graphdef), params, batches, jnp.asarray(token_bytes, jnp.float32))
    return {**metrics_from_sums(sums), "windows": len(wins)}


def run_unigram_bpb(cfg: ConfigDict, tokenizer: Tokenizer, sequences: list[np.ndarray]) -> tuple[float | None, str]:
    """The unigram baseline of `sequences` (lmjax/eval/baselines.py) fitted to the run's own data.train, and
    where it came from; (None, why) when the run's data.train cannot be read here (a relative path from
    another directory, an imported model, preference pairs)."""
    try:
        train_counts = open_chunks(cfg.data.train, tokenizer, cfg.model.seq_len, log=lambda _: None).unigram
    except LmjaxError as e:
        return None, f"unavailable: the run's data.train {cfg.data.train!r} cannot be read ({e})"
    token_bytes = tokenizer.token_bytes()
    return (unigram_bpb_from_counts(train_counts, target_counts(sequences, len(token_bytes)), token_bytes),
            f"fitted on data.train {cfg.data.train}")


def evaluate_source(workdir: str, source: str, step: int | None = None, stride: int | None = None,
                    max_docs: int | None = None, batch_size: int = 8) -> dict:
    """`lmjax eval lm`: loss, perplexity and bits per byte of a run's model on a data spec's documents (or
    chat:... conversations) scored whole (stride default: half the context), with the unigram baseline."""
    start = time.time()
    wd = open_workdir(workdir)
    context = wd.load_config().model.seq_len
    stride = context // 2 if stride is None else stride
    if not 1 <= stride <= context:
        raise ConfigError(f"--stride {stride}: must be between 1 and the model's context, {context} tokens")
    if batch_size < 1 or (max_docs is not None and max_docs < 1):
        raise ConfigError("--batch and --max-docs must be positive")
    cfg, graphdef, params, tokenizer, step = restore_model(wd, step)
    sequences = load_sequences(source, tokenizer, max_docs)
    metrics = score_sequences(params, graphdef, sequences, tokenizer.token_bytes(), context, stride, batch_size)
    baseline, baseline_note = run_unigram_bpb(cfg, tokenizer, sequences)
    return {"workdir": str(workdir), "source": source, "step": step, "context": context, "stride": stride,
            "documents": len(sequences), **metrics, "unigram_bpb": baseline, "unigram_note": baseline_note,
            "seconds": time.time() - start}


def format_lm(result: dict) -> str:
    """A small table of `evaluate_source`'s result."""
    baseline = "n/a" if result["unigram_bpb"] is None else f"{result['unigram_bpb']:.4f}"
    return "\n".join([
        f"{result['workdir']} (step {result['step']}) on {result['source']}: {result['documents']:,} documents "
        f"scored whole, {result['windows']:,} windows of <= {result['context']} tokens, stride {result['stride']}",
        f"{'loss (nats/token)':<22} {result['loss']:.4f}",
        f"{'perplexity':<22} {result['ppl']:.3f}",
        f"{'bits per byte':<22} {result['bpb']:.4f}",
        f"{'unigram bits per byte':<22} {baseline}   ({result['unigram_note']})",
        f"{'tokens scored':<22} {result['tokens']:,}",
        f"{'bytes':<22} {result['bytes']:,}",
        f"{'seconds':<22} {result['seconds']:.1f}",
    ])

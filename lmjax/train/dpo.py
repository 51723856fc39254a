"""Direct preference optimisation (DPO, Rafailov et al. 2023) against a frozen reference model.

A preference pair is {"prompt": messages, "chosen": text, "rejected": text} (the format of
`lmjax feedback export`). Each reply is encoded after its prompt with the chat template, one sequence
per row (no packing), left-aligned and padded; only the reply tokens count. With the log-ratio
margin m = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)), the loss is
-log sigmoid(beta * m) and a pair is ranked correctly when m > 0.

A DPO batch holds `chosen_*` and `rejected_*` versions of the usual batch arrays (`inputs`, `targets`,
`segment_ids`, `positions`, `loss_mask`), one pair per row. DPO runs without dropout.
"""

import glob

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lmjax.data.chat import check_conversation, encode_chat, read_jsonl
from lmjax.data.tokenizer import Tokenizer
from lmjax.model.params import Params
from lmjax.train.step import Batch, State, accumulated_update, loss_weights, token_losses

SIDES = ("chosen", "rejected")
Pair = dict


def read_pairs(spec: str) -> list[Pair]:
    """Preference pairs from JSONL files (`jsonl:GLOB` or `GLOB`); a malformed line raises ValueError."""
    files = sorted(glob.glob(spec.removeprefix("jsonl:"), recursive=True))
    if not files:
        raise ValueError(f"preference source {spec!r}: no files match")
    pairs = []
    for path in files:
        for where, pair in read_jsonl(path):
            if not isinstance(pair, dict) or not all(isinstance(pair.get(k), str) for k in SIDES):
                raise ValueError(f'{where}: expected {{"prompt": messages, "chosen": str, "rejected": str}}')
            check_conversation(pair.get("prompt"), where)
            pairs.append(pair)
    return pairs


def split_heldout(pairs: list[Pair], every: int = 10) -> tuple[list[Pair], list[Pair]]:
    """(train, held-out): every `every`-th pair is held out (at least one, if there are two or more)."""
    heldout = set(range(every - 1, len(pairs), every)) or ({len(pairs) - 1} if len(pairs) > 1 else set())
    return ([p for i, p in enumerate(pairs) if i not in heldout], [p for i, p in enumerate(pairs) if i in heldout])


def encode_pairs(pairs: list[Pair], tokenizer: Tokenizer, seq_len: int) -> list[dict[str, np.ndarray]]:
    """One row per pair: `chosen_*` and `rejected_*` arrays of length `seq_len`, the loss mask on the reply
    only. Pairs with a side longer than seq_len + 1 tokens are dropped."""
    rows = []
    for pair in pairs:
        row = {}
        prompt, _ = encode_chat(pair["prompt"], tokenizer, add_generation_prompt=True)
        for side in SIDES:
            ids, mask = encode_chat([*pair["prompt"], {"role": "assistant", "content": pair[side]}], tokenizer)
            mask[: len(prompt)] = 0
            n = len(ids) - 1
            if n > seq_len:
                break
            pad = (0, seq_len - n)
            row |= {f"{side}_inputs": np.pad(ids[:-1], pad), f"{side}_targets": np.pad(ids[1:], pad),
                    f"{side}_segment_ids": np.pad(np.ones(n, np.int32), pad),
                    f"{side}_positions": np.pad(np.arange(n, dtype=np.int32), pad),
                    f"{side}_loss_mask": np.pad(mask[1:], pad)}
        else:
            rows.append(row)
    return rows


def pair_batches(rows: list[dict[str, np.ndarray]], batch_size: int, seed: int, shard_index: int = 0,
                 shard_count: int = 1) -> grain.DatasetIterator:
    """Endless iterator of [batch_size, seq_len] batches of shard `shard_index` of the encoded pairs `rows`
    (`encode_pairs`), reshuffled every epoch from `seed`; deterministic, with get_state()/set_state() for
    checkpoints."""
    rows = rows[shard_index::shard_count]
    if len(rows) < batch_size:
        raise ValueError(f"{len(rows)} preference pairs that fit seq_len in data shard {shard_index}, "
                         f"fewer than the batch of {batch_size}")
    ds = grain.MapDataset.source(rows).seed(seed).shuffle().repeat(None)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0)).batch(batch_size, drop_remainder=True))


def eval_pair_batches(pairs: list[Pair], tokenizer: Tokenizer, seq_len: int, batch_size: int,
                      num_batches: int, process_index: int = 0, process_count: int = 1) -> list[Batch]:
    """Deterministic batches of at most `num_batches * batch_size * process_count` held-out pairs, dealt
    out to processes; the last batch is padded with all-zero rows (which count as no pair)."""
    rows = encode_pairs(pairs, tokenizer, seq_len)[: num_batches * batch_size * process_count]
    if not rows:
        raise ValueError(f"no held-out preference pair fits seq_len {seq_len}")
    n_batches = -(-len(rows) // (batch_size * process_count))
    rows = rows[process_index::process_count]
    rows += [jax.tree.map(np.zeros_like, rows[0])] * (n_batches * batch_size - len(rows))
    return [{k: np.stack([r[k] for r in rows[i:i + batch_size]]) for k in rows[0]}
            for i in range(0, len(rows), batch_size)]


def sequence_logprobs(params: Params, graphdef: nnx.GraphDef, batch: Batch) -> jax.Array:
    """Sum of the log-probabilities of the target tokens where loss_mask is 1, shape [batch]."""
    return -(token_losses(params, graphdef, batch) * loss_weights(batch)).sum(-1)


def _pair_logprobs(params: Params, graphdef: nnx.GraphDef, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """(chosen, rejected) sequence log-probs from one forward pass over both sides."""
    both = {k: jnp.concatenate([batch[f"{s}_{k}"] for s in SIDES]) for k in
            ("inputs", "targets", "segment_ids", "positions", "loss_mask")}
    return jnp.split(sequence_logprobs(params, graphdef, both), 2)


def _pair_terms(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """Per-pair (loss, correct, log-ratio margin)."""
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    return -jax.nn.log_sigmoid(beta * margin), (margin > 0).astype(jnp.float32), margin


def dpo_loss(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array,
             ref_rejected: jax.Array, beta: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean DPO loss over pairs, and the mean preference accuracy and log-ratio margin."""
    loss, correct, margin = _pair_terms(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    return loss.mean(), {"accuracy": correct.mean(), "margin": margin.mean()}


def _pair_sums(params: Params, ref_params: Params, batch: Batch, graphdef: nnx.GraphDef,
               beta: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss sum, {pairs, accuracy, margin} sums) over the real (non-padding) pairs of a batch."""
    weights = (batch["chosen_loss_mask"].sum(-1) > 0).astype(jnp.float32)
    ref = jax.lax.stop_gradient(_pair_logprobs(ref_params, graphdef, batch))
    loss, correct, margin = _pair_terms(*_pair_logprobs(params, graphdef, batch), *ref, beta)
    return (loss * weights).sum(), {"pairs": weights.sum(), "accuracy": (correct * weights).sum(),
                                    "margin": (margin * weights).sum()}


def dpo_step(state: State, ref_params: Params, batch: Batch, *, graphdef: nnx.GraphDef,
             tx: optax.GradientTransformation, beta: float) -> tuple[State, dict[str, jax.Array]]:
    """One optimizer step of DPO over `grad_accum` micro-batches of pairs (leading axis); metrics are
    means over the step's pairs."""

    def summed_loss(params, micro, rng):
        return _pair_sums(params, ref_params, micro, graphdef, beta)

    return accumulated_update(state, batch, summed_loss, tx, count_key="pairs")


def dpo_eval_step(params: Params, ref_params: Params, batch: Batch, *, graphdef: nnx.GraphDef,
                  beta: float) -> dict[str, jax.Array]:
    """Sums over one batch of held-out pairs: loss, pairs, correctly ranked pairs and margins."""
    loss, sums = _pair_sums(params, ref_params, batch, graphdef, beta)
    return {"loss": loss, **sums}


def evaluate_pairs(eval_fn, params: Params, ref_params: Params, batches) -> dict[str, float]:
    """Mean DPO loss, preference accuracy and log-ratio margin of `eval_fn` (a `dpo_eval_step`) over batches."""
    sums = None
    for batch in batches:
        out = eval_fn(params, ref_params, batch)
        sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    sums = jax.device_get(sums)
    n = max(float(sums["pairs"]), 1.0)
    return {f"val_{k}": float(sums[k]) / n for k in ("loss", "accuracy", "margin")}

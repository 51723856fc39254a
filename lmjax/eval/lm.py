"""Language-model evaluation: validation loss, perplexity and bits per byte of a model on packed batches."""

import math
from collections.abc import Callable, Iterable

import jax
from flax import nnx

from lmjax.model.loss import Batch, loss_weights, token_losses
from lmjax.model.params import Params


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


def lm_metrics(eval_fn: Callable, params: Params, batches: Iterable[Batch], token_bytes: jax.Array) -> dict[str, float]:
    """val_loss (nats per counted token), val_ppl and val_bpb of `eval_fn` (a jitted `eval_step`) over
    `batches`."""
    sums = {"loss_sum": 0.0, "tokens": 0.0, "bytes": 0.0}
    for batch in batches:
        out = eval_fn(params, batch, token_bytes)
        sums = {k: sums[k] + out[k] for k in sums}
    sums = jax.device_get(sums)
    loss = float(sums["loss_sum"] / max(sums["tokens"], 1))
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)),
            "val_bpb": float(sums["loss_sum"] / math.log(2) / max(sums["bytes"], 1))}

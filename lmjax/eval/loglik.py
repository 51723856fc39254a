"""Log-likelihood of continuations: how multiple-choice tasks (and lm-eval's `loglikelihood`) score a model.

A request is (context ids, continuation ids); its score is the sum of log p(continuation | context) and whether
greedy decoding would have produced the continuation. Requests are packed one per row into fixed [rows, width]
arrays (width = the model's context), so one program compiles whatever the lengths; a request longer than the
context keeps its continuation and the end of its context (left truncation, as lm-eval does).
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmjax.config import DataError
from lmjax.model.params import Params

Request = tuple[Sequence[int], Sequence[int]]


def continuation_scores(params: Params, tokens: jax.Array, targets: jax.Array, mask: jax.Array, *,
                        graphdef: nnx.GraphDef) -> tuple[jax.Array, jax.Array]:
    """tokens, targets, mask: [B, T] (targets are tokens shifted by one; mask marks continuation targets) ->
    (sum of the masked targets' log-probabilities [B], whether each masked target is the argmax [B])."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits, _ = nnx.merge(graphdef, params)(tokens, positions, jnp.ones_like(tokens))  # padding is at the end
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(logits, axis=-1) == targets
    return (chosen * mask).sum(axis=1), jnp.all(greedy | (mask == 0), axis=1)


class LoglikScorer:
    """Scores requests in batches of `rows` with one compiled program of the model's context width."""

    def __init__(self, graphdef: nnx.GraphDef, params: Params, context: int, rows: int = 16):
        self.params, self.width, self.rows = params, context, rows
        self._score = jax.jit(functools.partial(continuation_scores, graphdef=graphdef))

    def score(self, requests: Sequence[Request]) -> list[tuple[float, bool]]:
        """(log-likelihood, is greedy) of each request, in order."""
        out: list[tuple[float, bool]] = []
        for start in range(0, len(requests), self.rows):
            batch = requests[start:start + self.rows]
            tokens = np.zeros((self.rows, self.width), np.int32)
            targets = np.zeros((self.rows, self.width), np.int32)
            mask = np.zeros((self.rows, self.width), np.float32)
            for row, (context, continuation) in enumerate(batch):
                if not continuation:
                    raise DataError("a log-likelihood request has an empty continuation")
                if not context:
                    raise DataError("a log-likelihood request needs at least one context token (e.g. bos)")
                if len(continuation) > self.width:
                    raise DataError(f"a continuation of {len(continuation)} tokens does not fit the model's "
                                    f"context of {self.width}")
                ids = (list(context) + list(continuation))[-(self.width + 1):]
                n = len(ids) - 1
                tokens[row, :n], targets[row, :n] = ids[:-1], ids[1:]
                mask[row, n - len(continuation):n] = 1
            sums, greedy = jax.device_get(self._score(self.params, tokens, targets, mask))
            out += [(float(s), bool(g)) for s, g in zip(sums[:len(batch)], greedy[:len(batch)], strict=True)]
        return out

"""The decoder-only transformer: GPT-2 and Llama families from one config.

Shapes: B batch, T length, D d_model, L layers, V vocab. Packed training rows carry `segment_ids` (0 = padding)
and `positions` (restart at 0 in each document), so documents never attend to each other.

The blocks are held one of two ways (`model.scan_layers`). Unrolled: a list of L blocks, params
`blocks/{i}/...`, run one after the other in Python, so the compiled program holds L copies of the block.
Scanned: one block whose params carry a leading `LAYERS` axis, params `blocks/...` [L, ...], run by
`jax.lax.scan` over that axis in training, so the block is compiled once whatever L (compile time stays flat
with depth). Both compute the same values from the same weights (`params.stack_layers` / `unstack_layers`
convert between them), and a fresh scanned model holds exactly the unrolled one's initial weights, stacked.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from lmjax.model.attention import Attention, write_at
from lmjax.model.config import ModelConfig
from lmjax.model.layers import MLPS, PROJECTION, LayerNorm, RMSNorm, dropout, head_logits, param
from lmjax.model.quantized import QArray, take_rows
from lmjax.parallel.rules import constrain

# What a rematerialised block keeps for the backward pass (`model.remat`); the rest is recomputed there.
# "dots": the outputs of the matmuls without batch dimensions, i.e. the projections, in the compute dtype
# (the effect of `dots_with_no_batch_dims_saveable`, which cannot see into `project`'s custom VJP);
# attention scores and probabilities, norms, RoPE and activations are recomputed. "full": nothing but
# the block's input. "nothing" means no rematerialisation (the block is not wrapped at all).
REMAT = {
    "dots": jax.checkpoint_policies.save_only_these_names(PROJECTION),
    "full": jax.checkpoint_policies.nothing_saveable,
}


LAYERS = "layers"  # logical axis of the scanned blocks' stacked params (`model.scan_layers`; replicated by default)

# The logit of the vocabulary's padding ids (see `ModelConfig.padded_vocab`): finite, so no 0 x inf makes a
# NaN anywhere, and so low that its exp() is exactly 0 in float32 (also divided by any sensible sampling
# temperature): softmax, cross-entropy and sampling see the real vocabulary only, and no gradient reaches
# the padding rows through the logits.
MASKED_LOGIT = -1e9


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        out_std = None if cfg.zero_init_out else 0.02 / math.sqrt(2 * cfg.num_layers)  # None: zeros
        norm = LayerNorm if cfg.arch.layer_norm else RMSNorm
        mlp = MLPS[cfg.mlp]
        self.dropout = cfg.dropout
        self.attn_norm = norm(cfg.d_model, cfg.norm_eps, pdt, rngs)
        self.attn = Attention(cfg, out_std, rngs)
        self.mlp_norm = norm(cfg.d_model, cfg.norm_eps, pdt, rngs)
        self.mlp = mlp(cfg.d_model, cfg.d_ff, out_std, jnp.dtype(cfg.dtype), pdt, rngs)

    def __call__(self, x, positions, segment_ids, rng=None, cache=None, valid=None, index=None):
        rngs = (None, None) if rng is None else tuple(jax.random.split(rng))
        h, cache = self.attn(self.attn_norm(x), positions, segment_ids, cache, valid, index)
        x = constrain(x + dropout(h, self.dropout, rngs[0]), ("batch", "length", "embed"))
        h = self.mlp(self.mlp_norm(x))
        x = constrain(x + dropout(h, self.dropout, rngs[1]), ("batch", "length", "embed"))
        return x, cache


class Transformer(nnx.Module):
    """Token ids -> next-token logits (float32)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (from the tokenizer) before building the model")
        pdt = jnp.dtype(cfg.param_dtype)
        vocab = cfg.padded_vocab
        self.dtype = jnp.dtype(cfg.dtype)
        self.dropout = cfg.dropout
        self.vocab_size = cfg.vocab_size
        self.embed = param(rngs, (vocab, cfg.d_model), ("vocab", "embed"), pdt)
        self.learned_positions = cfg.arch.learned_positions
        if self.learned_positions:
            self.pos_embed = param(rngs, (cfg.seq_len, cfg.d_model), ("position", "embed"), pdt, std=0.01)
        blocks = [Block(cfg, rngs) for _ in range(cfg.num_layers)]
        self.num_layers = cfg.num_layers
        self.scan_layers = cfg.scan_layers
        self.blocks = stack_blocks(blocks) if cfg.scan_layers else nnx.List(blocks)
        self.final_norm = (LayerNorm if cfg.arch.layer_norm else RMSNorm)(cfg.d_model, cfg.norm_eps, pdt, rngs)
        self.tie_embeddings = cfg.tie_embeddings
        self.logit_softcap = cfg.logit_softcap
        self.remat = cfg.remat
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, (cfg.d_model, vocab), ("embed", "vocab"), pdt)

    def __call__(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array, *,
                 dropout_rng: jax.Array | None = None, cache: dict | None = None,
                 embed_delta: jax.Array | None = None,
                 logits_at: jax.Array | None = None) -> tuple[jax.Array, dict | None]:
        """tokens, positions, segment_ids: [B, T] int32 -> (logits [B, T, V] float32, updated cache).
        V is the padded vocabulary; the logits of the padding ids are `MASKED_LOGIT`. With `logits_at` [B], only
        the logits at position `logits_at[b]` of each row are computed: [B, 1, V] (a prefill needs just the last
        prompt token's, and the full [B, T, V] would dwarf the activations for a large vocabulary).

        `dropout_rng` turns dropout on (training). `embed_delta` [B, T, D] is added to the token embeddings
        (adversarial training and robustness evaluation perturb there, lmjax/model/perturb.py).
        `cache` (from `init_cache`) switches to decoding:
        each row's T new tokens are written from its slot `cache['index'][b]` on and attend to all earlier
        valid slots of their row.
        Without a cache each block is rematerialised under `model.remat` (this only changes what the
        backward pass stores and recomputes, never the values); scanned blocks run under `jax.lax.scan`, the
        rematerialised block as its body. With a cache, scanned blocks run one by one in Python as unrolled ones
        do (each on its slice of the stacked params), so the per-layer cache stays as `init_cache` makes it.
        """
        x = embed_tokens(self.embed, tokens, self.dtype)
        if embed_delta is not None:
            x = x + embed_delta.astype(self.dtype)
        if self.learned_positions:
            x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(self.dtype)
        x = constrain(x, ("batch", "length", "embed"))
        # One dropout key per layer (the block splits it for its two dropouts) and one for the embeddings.
        rngs = None if dropout_rng is None else jax.random.split(dropout_rng, self.num_layers + 1)
        x = dropout(x, self.dropout, None if rngs is None else rngs[-1])
        layer_rngs = None if rngs is None else rngs[:-1]
        new_cache = None
        if cache is None:
            x = self._train_blocks(x, positions, segment_ids, layer_rngs)
        else:
            x, new_cache = self._decode_blocks(x, positions, segment_ids, layer_rngs, cache)
        if logits_at is not None:
            x = x[jnp.arange(x.shape[0]), logits_at][:, None]
        x = self.final_norm(x)
        if self.tie_embeddings:
            logits = head_logits(x, self.embed, "btd,vd->btv", self.dtype)
        else:
            logits = head_logits(x, self.lm_head, "btd,dv->btv", self.dtype)
        if self.logit_softcap:
            logits = self.logit_softcap * jnp.tanh(logits / self.logit_softcap)
        if logits.shape[-1] > self.vocab_size:
            logits = jnp.where(jnp.arange(logits.shape[-1]) < self.vocab_size, logits, MASKED_LOGIT)
        logits = constrain(logits, ("batch", "length", "vocab"))
        return logits, new_cache

    def _train_blocks(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                      rngs: jax.Array | None) -> jax.Array:
        """The blocks without a cache, each rematerialised under `model.remat`; `rngs` [L] dropout keys or None."""
        if not self.scan_layers:
            for i, block in enumerate(self.blocks):
                x = _train_block(block, self.remat, x, positions, segment_ids, None if rngs is None else rngs[i])
            return x
        graphdef, params = nnx.split(self.blocks)

        def body(x, layer):
            params, rng = layer
            return _train_block(nnx.merge(graphdef, params), self.remat, x, positions, segment_ids, rng), None

        return jax.lax.scan(body, x, (params, rngs))[0]

    def _decode_blocks(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array, rngs: jax.Array | None,
                       cache: dict) -> tuple[jax.Array, dict]:
        """The blocks one by one, each reading and writing its layer of `cache`; returns the updated cache."""
        index = cache["index"]
        valid = write_at(cache["valid"], segment_ids != 0, index)
        layer_caches = []
        for i, block in enumerate(self.layer_blocks()):
            rng = None if rngs is None else rngs[i]
            x, layer_cache = block(x, positions, segment_ids, rng, cache["layers"][i], valid, index)
            layer_caches.append(layer_cache)
        return x, {"layers": layer_caches, "valid": valid, "index": index + x.shape[1]}

    def layer_blocks(self) -> list[Block]:
        """The L blocks in order; scanned, each is a Block on its layer's slice of the stacked params."""
        if not self.scan_layers:
            return list(self.blocks)
        graphdef, params = nnx.split(self.blocks)
        return [nnx.merge(graphdef, jax.tree.map(lambda w, i=i: w[i], params)) for i in range(self.num_layers)]


def stack_blocks(blocks: list[Block]) -> Block:
    """One Block holding the params of `blocks` stacked along a new leading axis, logical axis `LAYERS`."""
    graphdef, _ = nnx.split(blocks[0])
    stacked = jax.tree.map(lambda *layers: jnp.stack(layers), *(nnx.state(block) for block in blocks))
    for _, var in nnx.to_flat_state(stacked):
        var.set_metadata("axes", (LAYERS, *var.get_metadata()["axes"]))
    return nnx.merge(graphdef, stacked)


def embed_tokens(embed: nnx.Param, tokens: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """The embedding rows of `tokens` in `dtype` (the table may be quantized)."""
    table = embed.get_value()
    if isinstance(table, QArray):
        return take_rows(table, tokens, dtype)
    return jnp.take(table, tokens, axis=0).astype(dtype)


def _train_block(block: Block, remat: str, x: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                 rng: jax.Array | None) -> jax.Array:
    """`block(x, ...)` without a cache; unless `remat` is "nothing", its backward pass keeps only what the
    policy `REMAT[remat]` saves and recomputes the rest of the block."""
    call = lambda b, *args: b(*args)[0]
    if remat != "nothing":
        call = nnx.remat(call, policy=REMAT[remat])
    return call(block, x, positions, segment_ids, rng)


def init_cache(cfg: ModelConfig | ConfigDict, batch_size: int, max_len: int) -> dict:
    """An empty KV cache: per-layer keys/values [B, max_len, kv_heads, head_dim] in `cache_dtype` (int8 with a
    float32 scale per token and head, "k_scale"/"v_scale" [B, max_len, kv_heads]), slot validity [B, max_len]
    and each row's next slot to write [B] (rows may hold sequences of different lengths)."""
    cfg = ModelConfig.from_config(cfg)
    shape = (batch_size, max_len, cfg.num_kv_heads, cfg.head_dim)
    dtype = jnp.dtype(cfg.cache_dtype or cfg.dtype)
    names = ("k", "v", "k_scale", "v_scale") if dtype == jnp.int8 else ("k", "v")
    layer = lambda: {name: jnp.ones(shape[:3], jnp.float32) if name.endswith("_scale") else jnp.zeros(shape, dtype)
                     for name in names}  # fresh arrays per layer: the engine donates each buffer
    return {
        "layers": [layer() for _ in range(cfg.num_layers)],
        "valid": jnp.zeros((batch_size, max_len), bool),
        "index": jnp.zeros(batch_size, jnp.int32),
    }

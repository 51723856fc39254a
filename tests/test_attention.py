"""The training attention implementations (`model.attention`) against XLA's reference: outputs and gradients
with packed segments, padding and grouped-query heads, in float32 and bfloat16; the backend checks."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx
from jax.sharding import Mesh

from lmjax.config import ConfigError, validate
from lmjax.model.attention_kernels import (
    _sharded_splash,
    blockwise_attention,
    cudnn_attention,
    resolve_attention,
    splash_attention,
    xla_attention,
)
from lmjax.model.loss import token_losses
from lmjax.model.params import abstract_model, init_params
from lmjax.parallel.rules import use_rules

# float32: the same sums in another order. bfloat16: q, k, v and the probabilities are rounded to bfloat16
# before their matmuls at different points (a few ulps of 2^-8 on values of order 1).
TOLERANCE = {"float32": 2e-5, "bfloat16": 4e-2}


def _inputs(length: int, dtype: str, batch: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 16):
    """Random q, k, v; row 0 packs three documents and ends in padding (segment 0), row 1 is one document."""
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(kq, (batch, length, heads, head_dim)).astype(dtype)
    k = jax.random.normal(kk, (batch, length, kv_heads, head_dim)).astype(dtype)
    v = jax.random.normal(kv, (batch, length, kv_heads, head_dim)).astype(dtype)
    t = jnp.arange(length)
    packed = jnp.where(t < length // 3, 1, jnp.where(t < length // 2, 2, jnp.where(t < length - 9, 3, 0)))
    segment_ids = jnp.stack([packed] + [jnp.ones(length, jnp.int32)] * (batch - 1)).astype(jnp.int32)
    return q, k, v, segment_ids


def _output_and_grads(attention, q, k, v, segment_ids):
    """attention(q, k, v, segment_ids) and the gradients of a random projection of it w.r.t. q, k, v."""
    weights = jax.random.normal(jax.random.PRNGKey(1), q.shape)

    def loss(q, k, v):
        out = attention(q, k, v, segment_ids)
        return (out.astype(jnp.float32) * weights).sum(), out

    grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def _assert_close(got, want, dtype: str):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        scale = max(float(jnp.abs(w.astype(jnp.float32)).max()), 1.0)
        assert float(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32)).max()) <= TOLERANCE[dtype] * scale


@pytest.mark.parametrize("length, block, dtype", [(70, 16, "float32"), (70, 16, "bfloat16"), (40, 128, "float32")])
def test_blockwise_equals_xla(length, block, dtype):
    """Five blocks, the last one padded (70 tokens); one block shorter than `block`."""
    inputs = _inputs(length, dtype)
    with jax.default_matmul_precision("highest"):  # float32 matmuls on GPUs default to TF32 (10-bit mantissa)
        got = _output_and_grads(functools.partial(blockwise_attention, block=block), *inputs)
        want = _output_and_grads(xla_attention, *inputs)
    _assert_close(got, want, dtype)


def test_splash_in_interpret_mode_equals_xla():
    """The TPU kernel run by Pallas's interpreter on CPU, in bfloat16 (float32 runs under a mesh below): 200
    tokens are padded to 256, two tiles of 128."""
    inputs = _inputs(200, "bfloat16", batch=2, heads=4, kv_heads=2, head_dim=32)
    got = _output_and_grads(functools.partial(splash_attention, interpret=True), *inputs)
    _assert_close(got, _output_and_grads(xla_attention, *inputs), "bfloat16")


def test_blockwise_never_materialises_the_scores():
    """The largest intermediate of the compiled forward and backward pass is a block's scores, not [B,H,T,T]."""
    q, k, v, segment_ids = _inputs(256, "float32", batch=1, heads=4, kv_heads=4)
    step = lambda attention: jax.jit(jax.grad(lambda q: attention(q, k, v, segment_ids).sum())).lower(q).compile()
    full = 4 * 4 * 256 * 256  # bytes of one float32 [1, 4, 256, 256]
    assert step(xla_attention).memory_analysis().temp_size_in_bytes >= full
    assert step(functools.partial(blockwise_attention, block=32)).memory_analysis().temp_size_in_bytes < full / 4


def _tiny_model_loss_and_grads(attention: str, dtype: str):
    """Mean loss of a one-layer Llama (grouped-query heads) on packed rows with padding, and its gradients."""
    cfg = tiny_config(f"model.attention={attention}", f"model.dtype={dtype}", "model.num_layers=1",
                      "tokenizer.vocab_size=128")
    cfg.model.vocab_size = 128
    graphdef, _, _ = abstract_model(cfg.model)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, cfg.model.seq_len), 0, 128)
    _, _, _, segment_ids = _inputs(cfg.model.seq_len, dtype)
    batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, -1), "segment_ids": segment_ids,
             "positions": jnp.broadcast_to(jnp.arange(cfg.model.seq_len), tokens.shape)}
    loss = lambda p: token_losses(p, graphdef, batch, jax.random.PRNGKey(3)).mean()
    return jax.jit(jax.value_and_grad(loss))(init_params(cfg.model, jax.random.PRNGKey(0)))


def test_tiny_model_trains_the_same_with_blockwise_attention():
    (loss, grads), (want_loss, want_grads) = (_tiny_model_loss_and_grads(a, "float32") for a in ("blockwise", "xla"))
    assert float(loss) == pytest.approx(float(want_loss), rel=1e-5)
    _assert_close(grads, want_grads, "float32")


on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention runs only on GPUs")


@on_gpu
@pytest.mark.parametrize("length, head_dim", [(70, 16), (257, 64)])
def test_cudnn_equals_xla_on_gpu(length, head_dim):
    """cuDNN's flash attention against XLA in bfloat16: packed segments with padding, grouped-query heads, and an
    odd length (padded by one token for cuDNN's backward)."""
    inputs = _inputs(length, "bfloat16", head_dim=head_dim)
    got = _output_and_grads(cudnn_attention, *inputs)
    _assert_close(got, _output_and_grads(xla_attention, *inputs), "bfloat16")


@on_gpu
def test_tiny_model_trains_the_same_with_cudnn_attention_on_gpu():
    (loss, grads), (want_loss, want_grads) = (_tiny_model_loss_and_grads(a, "bfloat16") for a in ("cudnn", "xla"))
    assert float(loss) == pytest.approx(float(want_loss), rel=1e-2)
    _assert_close(grads, want_grads, "bfloat16")


def test_auto_picks_per_backend_and_explicit_choices_check_it():
    assert resolve_attention("auto", "cpu", "bfloat16", 64, 256) == "xla"
    assert resolve_attention("auto", "cpu", "float32", 64, 1024) == "blockwise"  # faster from 1024 tokens on a CPU
    assert resolve_attention("auto", "gpu", "bfloat16", 64, 1024) == "cudnn"
    assert resolve_attention("auto", "tpu", "float32", 64, 256) == "splash"
    assert resolve_attention("auto", "gpu", "bfloat16", 128, 256) == "cudnn"
    assert resolve_attention("auto", "gpu", "float32", 64, 256) == "xla"  # cuDNN's flash attention is half precision
    assert resolve_attention("auto", "gpu", "bfloat16", 60, 256) == "xla"  # and needs a head width multiple of 8
    assert resolve_attention("blockwise", "cpu", "float32", 64, 256) == "blockwise"
    assert resolve_attention("cudnn", "gpu", "float16", 64, 256) == "cudnn"
    assert resolve_attention("splash", "tpu", "bfloat16", 64, 256) == "splash"
    with pytest.raises(ConfigError, match="model.attention=cudnn needs model.dtype bfloat16 or float16"):
        resolve_attention("cudnn", "gpu", "float32", 64, 256)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the refusals on a CPU")
@pytest.mark.parametrize("attention, message", [
    ("cudnn", "model.attention=cudnn runs only on GPUs; this backend is cpu"),
    ("splash", "model.attention=splash runs only on TPUs; this backend is cpu"),
])
def test_explicit_accelerator_attention_on_cpu_fails_clearly(attention, message):
    cfg = tiny_config(f"model.attention={attention}", "model.dtype=bfloat16", "tokenizer.vocab_size=128")
    cfg.model.vocab_size = 128
    graphdef, _, _ = abstract_model(cfg.model)
    model = nnx.merge(graphdef, init_params(cfg.model, jax.random.PRNGKey(0)))
    tokens = jnp.zeros((1, 8), jnp.int32)
    with pytest.raises(ConfigError, match=message):
        model(tokens, jnp.arange(8)[None], jnp.ones_like(tokens))


def test_unknown_attention_is_rejected():
    with pytest.raises(ConfigError, match=r"model.attention must be one of \('auto', 'xla', 'cudnn', 'splash', "
                                          r"'blockwise'\), got 'flash'"):
        validate(tiny_config("model.attention=flash"))


def _sharded_outputs() -> dict:
    """On 8 forced CPU devices (data 2 x tensor 4 over batch and heads): blockwise and splash (interpreted,
    inside shard_map) against xla, forward and gradients."""
    mesh = Mesh(np.array(jax.devices()).reshape(2, 1, 4), ("data", "fsdp", "tensor"))
    rules = {"batch": "data,fsdp", "length": "", "heads": "tensor", "kv_heads": "tensor", "head_dim": ""}
    inputs = _inputs(128, "float32", batch=2, heads=8, kv_heads=4, head_dim=16)
    errors = {}
    with use_rules(mesh, rules):
        want = _output_and_grads(xla_attention, *inputs)
        for name, attention in (("blockwise", functools.partial(blockwise_attention, block=32)),
                                ("splash", functools.partial(_sharded_splash, interpret=True))):
            got = _output_and_grads(attention, *inputs)
            errors[name] = max(float(jnp.abs(g - w).max()) for g, w in
                               zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True))
    return errors


def test_blockwise_and_splash_under_a_mesh_equal_xla():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    run = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=300,
                         cwd=os.path.dirname(__file__))
    assert run.returncode == 0, run.stderr[-4000:]
    errors = json.loads(run.stdout.splitlines()[-1])
    assert errors["blockwise"] <= 1e-4 and errors["splash"] <= 1e-4, errors


if __name__ == "__main__":
    print(json.dumps(_sharded_outputs()))

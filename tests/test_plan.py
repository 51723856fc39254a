"""Rematerialisation (same gradients, less memory) and `lmjax plan` (exact state bytes, an activation
estimate checked against what XLA compiles, mesh checks before compiling).

Run as a script, this file compiles train steps and prints their `memory_analysis()` (see `_measure`)."""

import functools
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from conftest import tiny_config
from flax import nnx
from jax.sharding import PartitionSpec

from lmjax.config import ConfigError, apply_overrides, load_config, validate
from lmjax.model.loss import token_losses
from lmjax.model.params import abstract_model, init_params
from lmjax.model.transformer import init_cache
from lmjax.parallel.rules import tree_specs
from lmjax.train.optim import make_optimizer
from lmjax.train.plan import check_sharding, format_plan, plan
from lmjax.train.step import init_state, train_step

# (name, overrides, remat policies) of the compiled train steps compared with the estimate: attention-heavy
# bfloat16 Llama (where remat matters most), a GPT-2 and a float32 Llama.
MEMORY_CASES = [
    ("llama-bf16", ["model.dtype=bfloat16", "model.num_layers=4", "model.seq_len=256", "model.d_ff=128",
                    "tokenizer.vocab_size=512", "train.batch_size=4"], ["nothing", "dots", "full"]),
    ("gpt2-bf16", ["model.family=gpt2", "model.num_kv_heads=0", "model.dtype=bfloat16", "model.num_layers=4",
                   "model.seq_len=128", "model.d_model=128", "model.d_ff=512", "tokenizer.vocab_size=512",
                   "train.batch_size=4"], ["nothing", "full"]),
    ("llama-f32", ["model.num_layers=4", "model.d_model=256", "model.d_ff=1024", "tokenizer.vocab_size=512",
                   "train.batch_size=4"], ["dots"]),
    ("llama-bf16-blockwise", ["model.dtype=bfloat16", "model.num_layers=4", "model.seq_len=256", "model.d_ff=128",
                              "tokenizer.vocab_size=512", "train.batch_size=4", "model.attention=blockwise"],
     ["nothing"]),
]


def _case_config(overrides: list[str], remat: str):
    cfg = tiny_config(*overrides, f"model.remat={remat}")
    cfg.model.vocab_size = cfg.tokenizer.vocab_size
    return cfg


def _batch(cfg, accum: int = 1):
    t = cfg.model.seq_len
    tokens = jax.random.randint(jax.random.PRNGKey(1), (accum, cfg.train.batch_size // accum, t), 0,
                                cfg.model.vocab_size)
    return {"inputs": tokens, "targets": jnp.roll(tokens, -1, -1), "segment_ids": jnp.ones_like(tokens),
            "positions": jnp.broadcast_to(jnp.arange(t), tokens.shape)}


def _gradients(family: str, dtype: str, remat: str):
    """Gradients of the mean loss of a tiny model with dropout on, on two sequences."""
    cfg = _case_config([f"model.family={family}", f"model.dtype={dtype}", "model.dropout=0.1",
                        "tokenizer.vocab_size=128"], remat)
    graphdef, _, _ = abstract_model(cfg.model)
    batch = jax.tree.map(lambda x: x[0, :2], _batch(cfg))
    loss = lambda p: token_losses(p, graphdef, batch, jax.random.PRNGKey(5)).mean()
    return jax.jit(jax.grad(loss))(init_params(cfg.model, jax.random.PRNGKey(0)))


@pytest.mark.parametrize("family, dtype", [("llama", "float32"), ("llama", "bfloat16"), ("gpt2", "bfloat16")])
def test_every_remat_policy_gives_the_gradients_of_no_remat(family, dtype):
    grads = {remat: _gradients(family, dtype, remat) for remat in ("nothing", "dots", "full")}
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads["nothing"]))
    for remat in ("dots", "full"):
        for got, want in zip(jax.tree.leaves(grads[remat]), jax.tree.leaves(grads["nothing"]), strict=True):
            if dtype == "float32":  # the same operations on the same values, dropout masks included
                assert jnp.array_equal(got, want)
            else:  # XLA may fuse a bfloat16 rounding differently in the recomputation: within ~2 ulps
                assert float(jnp.abs(got - want).max()) <= 1e-2 * scale


def test_decoding_with_a_kv_cache_ignores_remat():
    outs = []
    for remat in ("nothing", "full"):
        cfg = _case_config(["tokenizer.vocab_size=128"], remat).model
        graphdef, _, _ = abstract_model(cfg)
        model = nnx.merge(graphdef, init_params(cfg, jax.random.PRNGKey(0)))
        tokens = jnp.arange(6, dtype=jnp.int32)[None]
        logits, cache = model(tokens, jnp.arange(6)[None], jnp.ones_like(tokens), cache=init_cache(cfg, 1, 16))
        step, _ = model(tokens[:, -1:], jnp.full((1, 1), 6), jnp.ones((1, 1), jnp.int32), cache=cache)
        outs.append((logits, step))
    assert all(jnp.array_equal(a, b) for a, b in zip(outs[0], outs[1], strict=True))


def test_remat_is_validated():
    with pytest.raises(ConfigError, match=r"model.remat must be one of \('nothing', 'dots', 'full'\).*'some'"):
        validate(tiny_config("model.remat=some"))


def _measure(cases: list) -> dict:
    """`memory_analysis()` of the jitted, donated train step of every (name, overrides, remat) case."""
    out = {}
    for name, overrides, policies in cases:
        for remat in policies:
            cfg = _case_config(overrides, remat)
            graphdef, _, _ = abstract_model(cfg.model)
            tx = make_optimizer(cfg.train)
            state = jax.eval_shape(functools.partial(init_state, cfg.model, tx, 0))
            batch = jax.eval_shape(functools.partial(_batch, cfg))
            step = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, dropout=False), donate_argnums=0)
            memory = step.lower(state, batch).compile().memory_analysis()
            out[f"{name}/{remat}"] = memory.temp_size_in_bytes
    return out


def test_activation_estimate_tracks_the_compiled_train_step_and_full_remat_shrinks_it():
    """XLA:CPU's default scheduler favours concurrency: it computes the backward pass's recomputation as
    soon as its inputs exist, i.e. next to the forward pass, which undoes remat on CPU. GPU and TPU
    schedulers are memory-aware, so this compiles with XLA:CPU's memory-minimising scheduler, the
    schedule the estimate models. Within a factor of 2 either way, not exact: the estimate counts
    tensors, while XLA fuses, keeps or recomputes casts, reuses buffers and orders the backward pass
    its own way (it defers weight-gradient matmuls, keeping their inputs longer, on CPU)."""
    env = dict(os.environ, XLA_FLAGS="--xla_cpu_enable_concurrency_optimized_scheduler=false")
    run = subprocess.run([sys.executable, __file__, json.dumps(MEMORY_CASES)], capture_output=True, text=True,
                         env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    measured = json.loads(run.stdout.splitlines()[-1])
    for name, overrides, policies in MEMORY_CASES:
        p = plan(_case_config(overrides, "nothing"), 1)
        for remat in policies:
            # The compiled step's temporaries hold the gradients as well as the activations.
            estimate = p["activation_bytes_by_remat"][remat] + p["grad_bytes_per_device"]
            assert 0.5 <= measured[f"{name}/{remat}"] / estimate <= 2.0, (name, remat, measured, estimate)
    assert measured["llama-bf16/full"] < 0.8 * measured["llama-bf16/nothing"], measured
    assert measured["llama-bf16/dots"] < measured["llama-bf16/nothing"], measured
    assert measured["llama-bf16-blockwise/nothing"] < 0.8 * measured["llama-bf16/nothing"], measured


def _direct_state_bytes(cfg, sizes: dict[str, int]) -> dict[str, int]:
    """Per-device bytes of params and optimizer state: each `eval_shape` leaf's bytes divided by the number
    of devices its spec splits it over (asserting the split is even, so the division is exact)."""
    _, _, axes = abstract_model(cfg.model)
    state = jax.eval_shape(functools.partial(init_state, cfg.model, make_optimizer(cfg.train), 0))
    specs = tree_specs(sizes, dict(cfg.mesh.rules), state, axes)
    totals = {}
    for key in ("params", "opt_state"):
        total = 0
        flat_specs = jax.tree.leaves(specs[key], is_leaf=lambda x: isinstance(x, PartitionSpec))
        for leaf, spec in zip(jax.tree.leaves(state[key]), flat_specs, strict=True):
            mesh_axes = [a for part in spec if part for a in ((part,) if isinstance(part, str) else part)]
            shards = math.prod(sizes[a] for a in mesh_axes)
            assert leaf.size % shards == 0
            total += leaf.size * leaf.dtype.itemsize // shards
        totals[key] = total
    return totals


def test_plan_state_bytes_are_exact_for_llama_7b_on_256_fsdp_devices():
    # XLA's attention, so the bare plan below holds the attention probabilities.
    cfg = apply_overrides(load_config("configs/llama_7b.py"), ["mesh.fsdp=-1", "mesh.data=1", "model.attention=xla"])
    p = plan(cfg, 256, device_memory_gb=16)  # otherwise the config as shipped: remat=full, grad_accum=4
    direct = _direct_state_bytes(cfg, {"data": 1, "fsdp": 256, "tensor": 1})
    assert p["param_bytes_per_device"] == direct["params"] == p["grad_bytes_per_device"]
    assert p["opt_bytes_per_device"] == direct["opt_state"]
    # grad_accum > 1 keeps a second float32 gradient tree for the running sum.
    assert p["state_bytes_per_device"] == 3 * direct["params"] + direct["opt_state"]
    assert p["mesh"] == {"data": 1, "fsdp": 256, "tensor": 1} and p["batch_shards"] == 256
    assert p["fits"] and p["max_batch_size"] == 1024
    # 1024 sequences of 4096 tokens without remat: attention probabilities alone need ~400 GB per device.
    bare = plan(apply_overrides(cfg, ["model.remat=nothing", "train.grad_accum=1"]), 256, device_memory_gb=16)
    assert not bare["fits"] and bare["max_batch_size"] == 0
    assert p["flops_per_step"] > bare["flops_per_step"]


def test_plan_state_bytes_are_exact_for_llama_1b_on_one_80gb_device():
    cfg = load_config("configs/llama_1b.py")
    p = plan(cfg, 1, device_memory_gb=80)
    direct = _direct_state_bytes(cfg, {"data": 1, "fsdp": 1, "tensor": 1})
    assert p["param_bytes_per_device"] == direct["params"] == 4 * 1_235_814_400
    assert p["opt_bytes_per_device"] == direct["opt_state"]
    assert p["state_bytes_per_device"] == 3 * direct["params"] + direct["opt_state"]
    text = format_plan(p)
    assert f"fits 80 GB per device: {'yes' if p['fits'] else 'NO'}" in text
    assert "largest train.batch_size that fits" in text
    by_remat = p["activation_bytes_by_remat"]
    assert by_remat["full"] < by_remat["dots"] < by_remat["nothing"]


def test_flash_attention_drops_the_probabilities_from_the_estimate():
    """blockwise, cudnn and splash keep a log-sum-exp [B,H,T] float32 where XLA keeps the [B,H,T,T]
    probabilities (float32 and bfloat16) and holds their gradients; cudnn adds the [B,1,T,T] segment bias and
    its gradient. auto is resolved for the backend the plan is made for."""
    cfg = tiny_config("model.seq_len=1024", "model.dtype=bfloat16", "train.batch_size=8", "mesh.data=1")
    by = {a: plan(apply_overrides(cfg, [f"model.attention={a}"]), 1, 2) for a in ("xla", "blockwise", "cudnn")}
    B, H, T, layers = 8, 4, 1024, 2
    probabilities, lse, bias = B * H * T * T * (4 + 2), B * H * T * 4, B * T * T * 2
    xla, flash = by["xla"]["activation_bytes_per_device"], by["blockwise"]["activation_bytes_per_device"]
    assert xla - flash == layers * (probabilities - lse) + B * H * T * T * 8  # kept per layer; gradient temporaries
    assert by["cudnn"]["activation_bytes_per_device"] == flash + 2 * bias
    assert by["blockwise"]["max_batch_size"] > by["xla"]["max_batch_size"]
    assert by["xla"]["attention"] == "xla" and "model.attention:      blockwise\n" in format_plan(by["blockwise"])
    assert "model.attention:      splash (auto on tpu)" in format_plan(plan(cfg, 1, backend="tpu"))


@pytest.mark.parametrize("family,mlp", [("gpt2", "swiglu"), ("llama", "gelu"), ("gpt2", "relu2")])
def test_plan_reads_the_mlp_from_model_mlp_not_from_the_family(family, mlp):
    """`model.mlp` picks the MLP whatever the family: full remat recomputes every block matmul but the MLP's
    output projection (`down`, or gelu's `fc_out`), and only SwiGLU keeps a third [B, T, F] tensor."""
    kv = "model.num_kv_heads=0" if family == "gpt2" else "model.num_kv_heads=2"
    cfg = _case_config([f"model.family={family}", kv, f"model.mlp={mlp}"], "full")
    p = plan(cfg, 1)
    m = cfg.model
    attention = 4 * m.num_layers * m.num_heads * (m.d_model // m.num_heads) * m.seq_len
    matrices = {"gelu": 2, "swiglu": 3, "relu2": 2}[mlp] * m.d_model * m.d_ff + 4 * m.d_model * m.d_model * (
        1 if family == "gpt2" else 0.75)  # query, out and (llama: half-size) key, value
    tokens = cfg.train.batch_size * m.seq_len
    recompute = p["flops_per_step_by_remat"]["full"] - p["flops_per_step_by_remat"]["nothing"]
    assert recompute == pytest.approx((2 * m.num_layers * (matrices - m.d_ff * m.d_model) + attention) * tokens)


def test_plan_is_fast_and_the_cli_prints_the_remat_table():
    args = ["--config", "configs/llama_7b.py", "--devices", "256", "--device-memory-gb", "16",
            "--config.model.remat=full", "--config.train.grad_accum=4"]
    out = subprocess.run([sys.executable, "-m", "lmjax.cli", "plan", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "fits 16 GB per device: yes" in out.stdout and "activations (estimate)" in out.stdout
    for remat in ("nothing", "dots", "full"):
        assert f"\n  {remat} " in out.stdout


@pytest.mark.parametrize("overrides, message", [
    (["model.num_heads=32", "model.num_kv_heads=8", "model.d_ff=1024", "mesh.tensor=3"], "model.num_heads = 32"),
    (["model.num_heads=32", "model.num_kv_heads=8", "model.d_ff=1024", "mesh.tensor=16"],
     "the key/value heads .* = 8"),
    (["model.num_heads=8", "model.num_kv_heads=8", "model.d_ff=100", "mesh.tensor=8"], "model.d_ff = 100"),
])
def test_a_tensor_axis_that_does_not_divide_the_model_fails_before_compiling(overrides, message):
    cfg = tiny_config("model.d_model=256", "mesh.data=1", *overrides)
    tensor = cfg.mesh.tensor
    with pytest.raises(ConfigError, match=f"tensor mesh axis \\({tensor} devices\\) does not divide {message}"):
        check_sharding(cfg, {"data": 1, "fsdp": 1, "tensor": tensor})
    with pytest.raises(ConfigError, match=message):
        plan(cfg, cfg.mesh.tensor)


def test_shardings_the_mesh_cannot_apply_are_reported_by_plan():
    """fsdp=3 does not divide d_model=64: every parameter with an `embed` axis stays replicated along fsdp,
    and the plan says which (the params' bytes per device then include those whole arrays)."""
    cfg = tiny_config("mesh.data=1", "mesh.fsdp=3", "train.batch_size=6")
    p = plan(cfg, 3)
    [line] = p["dropped_shardings"]
    assert line.startswith("sharding dropped: the fsdp mesh axis (3 devices) does not divide logical axis 'embed' "
                           "of size 64; replicated along it: ")
    for param in ("embed dim 1", "lm_head dim 0", "blocks.*.attn.query dim 0 (x2)", "blocks.*.mlp.down dim 1 (x2)",
                  "final_norm.scale dim 0"):
        assert param in line
    assert line in format_plan(p)
    assert p["param_bytes_per_device"] == 4 * p["params"]  # nothing is sharded
    assert check_sharding(tiny_config("mesh.data=1", "mesh.fsdp=4"), {"data": 1, "fsdp": 4, "tensor": 1}) == []


if __name__ == "__main__":
    print(json.dumps(_measure(json.loads(sys.argv[1]))))

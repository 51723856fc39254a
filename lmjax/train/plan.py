"""Sizing a run before allocating anything: parameters, FLOPs per step (with the recomputation of
`model.remat`), and per-device memory of weights, gradients, optimizer state and activations on a given
mesh, from `jax.eval_shape` and an analytic activation model alone."""

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec
from ml_collections import ConfigDict

from lmjax.config import REMAT_POLICIES, ConfigError, validate
from lmjax.model.attention_kernels import resolve_attention
from lmjax.model.config import MLP_WEIGHTS, TENSOR_PARALLEL_AXES, ModelConfig
from lmjax.model.lora import LoraSpec, adapter_axes, frozen_base
from lmjax.model.params import abstract_model, count_params, flops_per_token
from lmjax.parallel.mesh import batch_shards, check_model_fits_mesh, mesh_shape
from lmjax.parallel.rules import logical_to_spec, path_names, tree_specs
from lmjax.run.restore import starting_model
from lmjax.train.metrics import peak_cache, training_dtype
from lmjax.train.optim import make_optimizer
from lmjax.train.step import init_lora_state, init_state


def _shard_elements(shape, spec, sizes: dict[str, int]) -> int:
    """Elements one device holds of an array of `shape` laid out by `spec` (uneven shards rounded up)."""
    shape = list(shape)
    for dim, axes in enumerate(spec):
        for axis in (axes,) if isinstance(axes, str) else axes or ():
            shape[dim] = math.ceil(shape[dim] / sizes[axis])
    return math.prod(shape)


def _bytes_per_device(tree, specs, sizes: dict[str, int]) -> int:
    """Bytes one device holds of `tree` laid out by `specs`."""
    shard_bytes = lambda leaf, spec: _shard_elements(leaf.shape, spec, sizes) * leaf.dtype.itemsize
    return sum(jax.tree.leaves(jax.tree.map(shard_bytes, tree, specs)))


def activation_bytes(cfg: ConfigDict, sizes: dict[str, int], micro_batch: int, remat: str, attention: str = "xla",
                     block_weight_bytes: int = 0, gathered_weight_bytes: int = 0) -> int:
    """Estimated peak per-device bytes of activations for one micro-batch of `micro_batch` sequences (all
    shards together) under the rematerialisation policy `remat` and the attention implementation `attention`
    (a resolved `model.attention`: xla, blockwise, cudnn or splash); an analytic model, not a measurement.

    B micro-batch, T seq_len, D d_model, H / K query / key-value heads of width hd, F d_ff, V padded vocab,
    L layers;
    s bytes of the compute dtype, 4 of float32. Each tensor is counted per device as the sharding rules
    split it (batch over the `batch` axes; heads, kv_heads, mlp and vocab over theirs). Kept per block for
    the backward pass:
      nothing: block input and attention-norm output 2[B,T,D]s; q, k, v after RoPE ([B,T,H,hd] + 2[B,T,K,hd])s;
               attention probabilities [B,H,T,T] in float32 (softmax gradient) and in the compute dtype
               (value-matmul gradient; the same buffer when s = 4); attention output [B,T,H,hd]s; MLP-norm
               input and output 2[B,T,D]s; MLP hidden 3[B,T,F]s (llama: gate, up, their product) or 2[B,T,F]s
               (gpt2: before and after GELU); dropout keep-masks 2[B,T,D] bytes if dropout > 0; and the
               compute-dtype copies of the block's weights (`block_weight_bytes` per device, if s < 4).
      dots:    the projection outputs: block input [B,T,D]s, q, k, v ([B,T,H,hd] + 2[B,T,K,hd])s, attention
               output projection [B,T,D]s, MLP input projections 2[B,T,F]s (llama) or [B,T,F]s (gpt2).
      full:    the block input [B,T,D]s.
    On top of L such sets: the block being differentiated holds what `nothing` keeps of it (recomputed
    under dots / full), its weights gathered over `fsdp` in the compute dtype (`gathered_weight_bytes`),
    and its gradient temporaries: the scores' and probabilities' gradients 2[B,H,T,T]4 and four float32
    [B,T,max(D,F)]; outside the blocks, the final norm's input and output 2[B,T,D]s, the
    float32 logits [B,T,V]4 (their softmax, kept for the loss gradient, takes their place) and that
    gradient [B,T,V]4.
    The [B,H,T,T] terms are XLA's (`xla`), which materialises the probabilities. The flash implementations
    (blockwise, cudnn, splash) keep the log-sum-exp [B,H,T]4 in their place and recompute the probabilities
    tile by tile in the backward pass (temporaries of a tile, not counted); `cudnn` also holds the segment
    mask as an additive bias [B,1,T,T]s, computed once for all blocks, and its gradient [B,1,T,T]s.
    Not exact: XLA fuses elementwise ops (it may keep or recompute a cast, keep a norm's float32 input),
    reuses buffers and orders the backward pass its own way, so the compiled peak is within about 0.5x-2x
    of this (tests/test_plan.py compares it with `memory_analysis()` on CPU).
    """
    m, rules = ModelConfig.from_config(cfg.model), dict(cfg.mesh.rules)
    s = jnp.dtype(m.dtype).itemsize
    B, T, D, F, V = micro_batch, m.seq_len, m.d_model, m.d_ff, m.padded_vocab
    H, K, hd = m.num_heads, m.num_kv_heads, m.head_dim

    def per_device(shape: tuple[int, ...], axes: tuple[str | None, ...], itemsize: float) -> float:
        return _shard_elements(shape, logical_to_spec(axes, rules, sizes, shape), sizes) * itemsize

    resid = per_device((B, T, D), ("batch", "length", "embed"), s)
    q = per_device((B, T, H, hd), ("batch", "length", "heads", "head_dim"), s)
    kv = 2 * per_device((B, T, K, hd), ("batch", "length", "kv_heads", "head_dim"), s)
    if attention == "xla":
        scores, lse, bias = per_device((B, H, T, T), ("batch", "heads", "length", None), 1), 0, 0
    else:
        scores, lse = 0, per_device((B, H, T), ("batch", "heads", "length"), 4)
        bias = per_device((B, 1, T, T), ("batch", None, "length", None), s) if attention == "cudnn" else 0
    hidden = per_device((B, T, F), ("batch", "length", "mlp"), s)
    widest = per_device((B, T, max(D, F)), ("batch", "length", "mlp" if F > D else "embed"), 4)
    logits = per_device((B, T, V), ("batch", "length", "vocab"), 1)
    gated = m.mlp == "swiglu"  # it keeps gate, up and their product where gelu and relu2 keep input and output
    kept = {
        "nothing": 4 * resid + 2 * q + kv + scores * (4 + (s if s < 4 else 0)) + lse + (3 if gated else 2) * hidden
        + (2 * resid / s if m.dropout > 0 else 0) + (block_weight_bytes if s < 4 else 0),
        "dots": 2 * resid + q + kv + (2 if gated else 1) * hidden,
        "full": resid,
    }
    if remat not in kept:
        raise ConfigError(f"model.remat must be one of {REMAT_POLICIES}, got {remat!r}")
    block_backward = kept["nothing"] - kept[remat] + gathered_weight_bytes + 8 * scores + 4 * widest
    outside = 2 * resid + 8 * logits + 2 * bias
    return int(m.num_layers * kept[remat] + block_backward + outside)


def recompute_flops_per_token(cfg: ConfigDict, block, remat: str) -> float:
    """Extra forward FLOPs per token that the backward pass spends recomputing under `remat`: none
    ("nothing"), the attention score and value matmuls ("dots"), or every block matmul but the MLP's output
    projection, whose result the backward pass never needs ("full"). `block`: one block's params (shapes)."""
    m = ModelConfig.from_config(cfg.model)
    attention = 4 * m.num_layers * m.num_heads * m.head_dim * m.seq_len
    if remat == "nothing":
        return 0.0
    if remat == "dots":
        return float(attention)
    mlp_out = block["mlp"][MLP_WEIGHTS[m.mlp][-1]]
    per_block = sum(math.prod(x.shape) for path, x in jax.tree_util.tree_flatten_with_path(block)[0]
                    if len(x.shape) > 1 and not path_names(path)[-1].endswith("bias"))  # [H, hd] biases are no matmul
    return float(2 * m.num_layers * (per_block - math.prod(mlp_out.shape)) + attention)


def _one_block(params, specs, scanned: bool) -> tuple:
    """One block's params (shapes) and PartitionSpecs, from the unrolled or the scanned (stacked) layout."""
    if not scanned:
        return params["blocks"][0], specs["blocks"][0]
    block = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), params["blocks"])
    block_specs = jax.tree.map(lambda spec: PartitionSpec(*spec[1:]), specs["blocks"],
                               is_leaf=lambda x: isinstance(x, PartitionSpec))
    return block, block_specs


def _with_vocab(cfg: ConfigDict) -> ConfigDict:
    """A copy of `cfg` with the model a new run will train (`starting_model`: a fine-tune's architecture and
    vocabulary from init_from); an unset model.vocab_size otherwise counts as tokenizer.vocab_size."""
    cfg = ConfigDict(cfg.to_dict())
    cfg.model = starting_model(cfg)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = cfg.tokenizer.vocab_size
    return cfg


def check_sharding(cfg: ConfigDict, sizes: dict[str, int]) -> list[str]:
    """`check_model_fits_mesh` for the parameters of `cfg`'s model on a mesh of `sizes` under `mesh.rules`:
    raises ConfigError if a mesh axis does not divide a tensor-parallel axis (heads, key/value heads, d_ff);
    returns a log line for each other sharding dropped. Builds only shapes, so it runs before any data is
    read; an unset model.vocab_size counts as tokenizer.vocab_size (the vocabulary the run will train)."""
    _, shapes, axes = abstract_model(_with_vocab(cfg).model)
    return check_model_fits_mesh(shapes, axes, dict(cfg.mesh.rules), sizes, TENSOR_PARALLEL_AXES)


def plan(cfg: ConfigDict, num_devices: int, device_memory_gb: float = 0.0, backend: str = "") -> dict:
    """Parameter count, training FLOPs (with remat's recomputation), per-device bytes of params / grads /
    optimizer state (of a LoRA run: the frozen base in its dtype, and the adapters with their gradients and
    optimizer state) and the estimated activations of one micro-batch (see `activation_bytes`) for each
    remat policy, with `model.attention=auto` resolved for `backend` ("cpu", "gpu", "tpu"; "" = this
    process's default backend). Given `device_memory_gb` (1 GB = 1e9 bytes), also whether the configured
    run fits and the largest train.batch_size that does (same grad_accum and remat, a multiple of the batch
    shards)."""
    validate(cfg)
    cfg = _with_vocab(cfg)
    backend = backend or jax.default_backend()
    if cfg.model.dtype == "auto":  # as training would resolve it on `backend`
        cfg.model.dtype = training_dtype(backend, peak_cache())[0]
    m, t = ModelConfig.from_config(cfg.model), cfg.train
    attention = (resolve_attention("auto", backend, m.dtype, m.head_dim, m.seq_len) if m.attention == "auto"
                 else m.attention)
    sizes = mesh_shape(cfg.mesh, num_devices)
    rules = dict(cfg.mesh.rules)
    _, params, axes = abstract_model(m)
    dropped = check_model_fits_mesh(params, axes, rules, sizes, TENSOR_PARALLEL_AXES)
    lora = LoraSpec.from_config(t.lora)
    base_bytes = unsharded_base = 0
    if lora.enabled:  # trainable: the adapters; the frozen base is held once, in its dtype, without gradients
        state = jax.eval_shape(functools.partial(init_lora_state, params, lora, m.mlp, make_optimizer(t), 0))
        specs = tree_specs(sizes, rules, state, adapter_axes(axes, state["params"]))
        base = jax.eval_shape(functools.partial(frozen_base, base_dtype=lora.base_dtype), params)
        base_bytes = _bytes_per_device(base, tree_specs(sizes, rules, base, axes), sizes)
        unsharded_base = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(base))
    else:
        state = jax.eval_shape(functools.partial(init_state, m, make_optimizer(t), 0))
        specs = tree_specs(sizes, rules, state, axes)
    param_bytes = _bytes_per_device(state["params"], specs["params"], sizes)
    opt_bytes = _bytes_per_device(state["opt_state"], specs["opt_state"], sizes)
    accum_bytes = param_bytes if t.grad_accum > 1 else 0
    state_bytes = base_bytes + 2 * param_bytes + accum_bytes + opt_bytes

    to_compute = jnp.dtype(m.dtype).itemsize / jnp.dtype(m.param_dtype).itemsize
    model_specs = tree_specs(sizes, rules, params, axes)
    block, block_specs = _one_block(params, model_specs, m.scan_layers)
    weights = {"block_weight_bytes": int(_bytes_per_device(block, block_specs, sizes) * to_compute),
               "gathered_weight_bytes": int(_bytes_per_device(block, block_specs, {**sizes, "fsdp": 1}) * to_compute)}
    shards, micro = batch_shards(rules, sizes), t.batch_size // t.grad_accum
    activations = {r: activation_bytes(cfg, sizes, micro, r, attention, **weights) for r in REMAT_POLICIES}

    # Parameters as allocated: the vocabulary's padding rows (and columns of an untied output projection)
    # are counted here and in the FLOPs, which the output matmul spends on them too.
    n = count_params(params)
    padding = (m.padded_vocab - m.vocab_size) * m.d_model * (1 if m.tie_embeddings else 2)
    # A LoRA run's FLOPs are counted as a full fine-tune's (an upper bound: it skips the base's weight gradients).
    fpt = flops_per_token(m, params)
    tokens_per_step = t.batch_size * m.seq_len
    flops_by_remat = {r: (fpt + recompute_flops_per_token(cfg, block, r)) * tokens_per_step for r in REMAT_POLICIES}
    result = {
        "params": n,
        "vocab_padding_params": padding,
        "padded_vocab": m.padded_vocab,
        "flops_per_token": fpt,
        "flops_per_step": flops_by_remat[m.remat],
        "flops_per_step_by_remat": flops_by_remat,
        "mesh": sizes,
        "remat": m.remat,
        "attention": attention,
        "attention_auto_backend": backend if m.attention == "auto" else "",
        "batch_size": t.batch_size,
        "grad_accum": t.grad_accum,
        "seq_len": m.seq_len,
        "batch_shards": shards,
        "micro_batch": micro,
        "lora_rank": lora.rank,
        "trainable_params": count_params(state["params"]),
        "base_bytes_per_device": base_bytes,
        "param_bytes_per_device": param_bytes,
        "grad_bytes_per_device": param_bytes,
        "grad_accum_bytes_per_device": accum_bytes,
        "opt_bytes_per_device": opt_bytes,
        "state_bytes_per_device": state_bytes,
        "unsharded_state_bytes": unsharded_base
        + 2 * sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state["params"]))
        + sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state["opt_state"])),
        "activation_bytes_per_device": activations[m.remat],
        "activation_bytes_by_remat": activations,
        "total_bytes_per_device": state_bytes + activations[m.remat],
        "dropped_shardings": dropped,
    }
    if device_memory_gb > 0:
        budget = device_memory_gb * 1e9
        one, two = (activation_bytes(cfg, sizes, k * shards, m.remat, attention, **weights) for k in (1, 2))
        spare = budget - state_bytes - one
        per_shard = 0 if spare < 0 else 1 + spare // (two - one)
        result.update(device_memory_bytes=int(budget), fits=result["total_bytes_per_device"] <= budget,
                      max_batch_size=int(per_shard) * shards * t.grad_accum)
    return result


def format_plan(p: dict) -> str:
    """Human-readable plan: FLOPs, per-device memory, activations under each remat policy and, when the
    plan was made for a device memory, whether it fits and the largest batch that does."""
    gb = 1e9
    per_device = p["micro_batch"] / p["batch_shards"]
    lines = [
        f"parameters:           {p['params']:,} ({p['params'] / 1e9:.3f} B"
        + (f"; {p['vocab_padding_params']:,} pad the vocabulary to {p['padded_vocab']})"
           if p["vocab_padding_params"] else ")"),
        f"mesh:                 {p['mesh']}; batch shards: {p['batch_shards']}",
        *p["dropped_shardings"],
        f"batch:                {p['batch_size']} sequences x {p['seq_len']} tokens per step = {p['grad_accum']} x "
        f"micro-batch of {p['micro_batch']} ({per_device:g} sequences per batch shard)",
        f"model.remat:          {p['remat']}",
        f"model.attention:      {p['attention']}"
        + (f" (auto on {p['attention_auto_backend']})" if p["attention_auto_backend"] else ""),
        f"training FLOPs/token: {p['flops_per_token']:.3e} (without recomputation)",
        f"training FLOPs/step:  {p['flops_per_step']:.3e} (including remat's recomputation; "
        f"{p['flops_per_step'] / math.prod(p['mesh'].values()):.3e} per device)",
        "per device:",
    ]
    if p["lora_rank"]:
        lines += [f"  frozen base (LoRA)     {p['base_bytes_per_device'] / gb:8.3f} GB",
                  f"  LoRA adapters          {p['param_bytes_per_device'] / gb:8.3f} GB (rank {p['lora_rank']}, "
                  f"{p['trainable_params']:,} trainable parameters)"]
    else:
        lines.append(f"  parameters             {p['param_bytes_per_device'] / gb:8.3f} GB")
    lines.append(f"  gradients              {p['grad_bytes_per_device'] / gb:8.3f} GB")
    if p["grad_accum_bytes_per_device"]:
        lines.append(f"  gradient accumulator   {p['grad_accum_bytes_per_device'] / gb:8.3f} GB")
    lines += [
        f"  optimizer state        {p['opt_bytes_per_device'] / gb:8.3f} GB",
        f"  activations (estimate) {p['activation_bytes_per_device'] / gb:8.3f} GB (one micro-batch, "
        f"remat={p['remat']})",
        f"  total                  {p['total_bytes_per_device'] / gb:8.3f} GB "
        f"(weights, gradients and Adam state unsharded: {p['unsharded_state_bytes'] / gb:.3f} GB)",
        "by model.remat (activations are an estimate; see lmjax/train/plan.py:activation_bytes):",
        "  remat      activations     total   FLOPs/step",
    ]
    for remat, act in p["activation_bytes_by_remat"].items():
        lines.append(f"  {remat:8} {act / gb:10.3f} GB {(p['state_bytes_per_device'] + act) / gb:6.1f} GB "
                     f"  {p['flops_per_step_by_remat'][remat]:.3e}")
    if per_device != int(per_device):
        lines.append(f"note: training needs train.batch_size / grad_accum to be a multiple of the "
                     f"{p['batch_shards']} batch shards")
    if "fits" in p:
        memory = p["device_memory_bytes"] / gb
        lines.append(f"fits {memory:g} GB per device: {'yes' if p['fits'] else 'NO'} "
                     f"({p['total_bytes_per_device'] / gb:.1f} GB needed)")
        if p["max_batch_size"]:
            lines.append(f"largest train.batch_size that fits (grad_accum={p['grad_accum']}, remat={p['remat']}): "
                         f"{p['max_batch_size']} sequences "
                         f"({p['max_batch_size'] // p['grad_accum'] // p['batch_shards']} per batch shard)")
        else:
            lines.append(f"not even one sequence per batch shard fits under remat={p['remat']}")
    return "\n".join(lines)

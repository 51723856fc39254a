"""Sizing a run before allocating anything: parameters, FLOPs per token and per-device memory of
weights, gradients and optimizer state on a given mesh, from `jax.eval_shape` alone."""

import functools
import math

import jax
from ml_collections import ConfigDict

from lmjax.config import validate
from lmjax.model.params import abstract_model, count_params, flops_per_token
from lmjax.parallel.mesh import mesh_shape
from lmjax.parallel.rules import tree_specs
from lmjax.train.optim import make_optimizer
from lmjax.train.step import init_state


def _bytes_per_device(tree, specs, sizes: dict[str, int]) -> int:
    """Bytes one device holds of `tree` laid out by `specs` (uneven shards rounded up)."""

    def shard_bytes(leaf, spec) -> int:
        shape = list(leaf.shape)
        for dim, axes in enumerate(spec):
            for axis in (axes,) if isinstance(axes, str) else axes or ():
                shape[dim] = math.ceil(shape[dim] / sizes[axis])
        return math.prod(shape) * leaf.dtype.itemsize

    return sum(jax.tree.leaves(jax.tree.map(shard_bytes, tree, specs)))


def plan(cfg: ConfigDict, num_devices: int) -> dict:
    """Parameter count, training FLOPs, and per-device bytes of params / grads / optimizer state."""
    validate(cfg)
    if cfg.model.vocab_size <= 0:
        cfg = ConfigDict(cfg.to_dict())
        cfg.model.vocab_size = cfg.tokenizer.vocab_size
    sizes = mesh_shape(cfg.mesh, num_devices)
    rules = dict(cfg.mesh.rules)
    _, params, axes = abstract_model(cfg.model)
    state = jax.eval_shape(functools.partial(init_state, cfg.model, make_optimizer(cfg.train), 0))
    specs = tree_specs(sizes, rules, state, axes)
    param_bytes = _bytes_per_device(state["params"], specs["params"], sizes)
    opt_bytes = _bytes_per_device(state["opt_state"], specs["opt_state"], sizes)
    n = count_params(params)
    fpt = flops_per_token(cfg.model, params)
    tokens_per_step = cfg.train.batch_size * cfg.model.seq_len
    return {
        "params": n,
        "flops_per_token": fpt,
        "flops_per_step": fpt * tokens_per_step,
        "mesh": sizes,
        "param_bytes_per_device": param_bytes,
        "grad_bytes_per_device": param_bytes,
        "opt_bytes_per_device": opt_bytes,
        "state_bytes_per_device": 2 * param_bytes + opt_bytes,
        "unsharded_state_bytes": 2 * sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state["params"]))
        + sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state["opt_state"])),
    }


def format_plan(p: dict, device_memory_gb: float = 0.0) -> str:
    """Human-readable plan; says whether the state fits when device memory is given."""
    gb = 1e9
    lines = [
        f"parameters:           {p['params']:,} ({p['params'] / 1e9:.3f} B)",
        f"training FLOPs/token: {p['flops_per_token']:.3e}",
        f"training FLOPs/step:  {p['flops_per_step']:.3e}",
        f"mesh:                 {p['mesh']}",
        "per device:",
        f"  parameters          {p['param_bytes_per_device'] / gb:10.3f} GB",
        f"  gradients           {p['grad_bytes_per_device'] / gb:10.3f} GB",
        f"  optimizer state     {p['opt_bytes_per_device'] / gb:10.3f} GB",
        f"  total (no activations) {p['state_bytes_per_device'] / gb:7.3f} GB "
        f"(unsharded: {p['unsharded_state_bytes'] / gb:.3f} GB)",
    ]
    if device_memory_gb:
        fits = p["state_bytes_per_device"] <= device_memory_gb * gb
        lines.append(f"fits {device_memory_gb:g} GB per device (before activations): {'yes' if fits else 'NO'}")
    return "\n".join(lines)

"""Loading a trained model out of a run directory: for sampling, serving, evaluation and fine-tuning."""

import functools
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from lmjax.config import ConfigError
from lmjax.model.config import FAMILY, ModelConfig
from lmjax.model.lora import LoraSpec, attach, frozen_base, init_adapters, merge
from lmjax.model.params import abstract_model, stack_layers, unstack_layers
from lmjax.model.quantized import for_matmul, quantize_params
from lmjax.run.checkpoint import Checkpointer
from lmjax.run.workdir import Workdir
from lmjax.text.tokenizer import Tokenizer, load_tokenizer

SHAPE_KEYS = ("family", "vocab_size", "vocab_multiple", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "d_model", "d_ff", "tie_embeddings", "qkv_bias", "mlp", "qk_norm", "param_dtype")
# What a model computes beyond its shapes; with SHAPE_KEYS, what `init_model` takes from the init_from run.
ARCH_KEYS = ("norm_eps", "rope_theta", "rope_scaling", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
             "rope_original_context", "logit_softcap")


class Restored(NamedTuple):
    cfg: ConfigDict
    graphdef: object  # nnx.GraphDef of the model
    params: dict
    tokenizer: Tokenizer
    step: int  # the checkpoint step the parameters come from


def decode_dtype(run_dtype: str, backend: str) -> str:
    """The compute dtype to run a trained model in: float32 on a CPU, where XLA widens bfloat16 matmul inputs at
    every step and bfloat16 decoding is several times slower than float32 without a bfloat16 matrix unit
    (docs/benchmarks.md, "Decoding"); the run's own dtype on accelerators. Parameters are float32 either way."""
    return "float32" if backend == "cpu" else run_dtype


def quant_matmul(setting: str, backend: str) -> str:
    """How quantized weights multiply (`compress.matmul`): "auto" is the integer matmul on a CPU, where XLA would
    widen every weight to float32 at every step, and dequantize-in-the-matmul on accelerators, where XLA fuses
    it (lmjax/model/quantized.py)."""
    if setting != "auto":
        return setting
    return "int8" if backend == "cpu" else "dequant"


@functools.cache
def _say_once(message: str) -> None:
    """Prints `message` on stderr the first time this process says it (a report restores a run many times)."""
    print(message, file=sys.stderr)


def restore_model(wd: Workdir, step: int | None = None, merge_lora: bool = False) -> Restored:
    """A trained run's model, params from checkpoint `step` (default latest), on the default device, computing
    in `decode_dtype` (said on stderr when that is not the run's dtype); a compressed run's quantized weights
    multiply the `quant_matmul` way. A LoRA run's params are its base (init_from, as it trained) with its
    adapters attached as `LoraWeight`s, or folded into plain weights with `merge_lora`. The layers always come
    unrolled (`model.scan_layers` False in the returned config): a scanned run's params are unstacked, so
    sampling, serving, evaluation, compression and export see one layout. Raises WorkdirError /
    CheckpointError with a clear message."""
    cfg = wd.load_config()
    saved_scanned, cfg.model.scan_layers = cfg.model.scan_layers, False
    dtype = decode_dtype(cfg.model.dtype, jax.default_backend())
    if dtype != cfg.model.dtype:
        _say_once(f"running {wd.path.name} in {dtype} on {jax.default_backend()} (it trained in {cfg.model.dtype})")
        cfg.model.dtype = dtype
    tokenizer = load_tokenizer(wd.tokenizer_dir)
    graphdef, abstract_params, _ = abstract_model(cfg.model)
    q = cfg.compress
    if q.quant:
        matmul = quant_matmul(q.matmul, jax.default_backend())
        groups = f" in groups of {q.group_size}" if q.group_size else " per output channel"
        print(f"{wd.path.name}: {q.quant} weights{groups}, {matmul} matmuls on {jax.default_backend()}",
              file=sys.stderr)
        abstract_params = jax.eval_shape(lambda p: quantize_params(p, q.quant, q.group_size), abstract_params)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    on_device = lambda tree: jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)
    lora = LoraSpec.from_config(cfg.train.lora)
    if lora.enabled:
        abstract_adapters = jax.eval_shape(
            lambda p: init_adapters(p, lora, ModelConfig.from_config(cfg.model).mlp, jax.random.PRNGKey(0)),
            abstract_params)
        with Checkpointer(wd.checkpoint_dir) as ckpt:
            step = ckpt.resolve_step(step)
            adapters = ckpt.restore_params(on_device(abstract_adapters), step)
        params = attach(lora_base(cfg, on_device(abstract_params)), adapters, lora)
        if merge_lora:
            params = merge(params, cfg.model.param_dtype)
        return Restored(cfg, graphdef, params, tokenizer, step)
    with Checkpointer(wd.checkpoint_dir) as ckpt:
        step = ckpt.resolve_step(step)
        params = restore_in_layout(ckpt, on_device(abstract_params), step, saved_scanned, scanned=False)
    if q.quant:
        params = for_matmul(params, matmul)
    return Restored(cfg, graphdef, params, tokenizer, step)


def starting_model(cfg: ConfigDict) -> ConfigDict:
    """`cfg.model` as a new run of `cfg` will train it. With `init_model`, the architecture (SHAPE_KEYS,
    ARCH_KEYS; for GPT-2 also seq_len, its position table's length) is the `init_from` run's: fine-tuning an
    imported model without restating its shapes. An unset vocab_size is `tokenizer.path`'s, else init_from's."""
    model = ConfigDict(cfg.model.to_dict())
    if cfg.init_model:
        source = Workdir(cfg.init_from).load_config().model
        for key in (*SHAPE_KEYS, *ARCH_KEYS, *(("seq_len",) if FAMILY[source.family].learned_positions else ())):
            model[key] = source[key]
    if model.vocab_size == 0 and cfg.tokenizer.path:
        model.vocab_size = load_tokenizer(cfg.tokenizer.path).vocab_size
    elif model.vocab_size == 0 and cfg.init_from:
        model.vocab_size = Workdir(cfg.init_from).load_config().model.vocab_size
    return model


def lora_base(cfg: ConfigDict, abstract_params):
    """The frozen base of the LoRA run `cfg`: its init_from parameters (restored into the shardings of
    `abstract_params`) held in `train.lora.base_dtype`. A bfloat16 base is restored straight into bfloat16 (Orbax
    casts), so no float32 copy is ever held."""
    if cfg.train.lora.base_dtype == "bfloat16":
        abstract_params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16, sharding=s.sharding),
                                       abstract_params)
    return frozen_base(init_params_from(cfg, abstract_params), cfg.train.lora.base_dtype)


def check_init_from(cfg: ConfigDict) -> int:
    """The checkpoint step of the `init_from` run that starts `cfg` (`init_from_step`, or its latest if that
    is -1), after checking that its model has the same parameter shapes (in either layer layout: `init_params_from`
    converts between scanned and unrolled). Reads no checkpoint data."""
    source = Workdir(cfg.init_from)
    source_cfg = source.load_config()
    if source_cfg.train.lora.rank > 0:
        raise ConfigError(f"init_from {source.path} is a LoRA run (its checkpoints hold only adapters); merge it "
                          f"into a plain run first: lmjax lora merge --workdir {source.path} --out DIR")
    source_model = source_cfg.model
    diff = {k: (_shape_knob(source_model, k), _shape_knob(cfg.model, k)) for k in SHAPE_KEYS
            if _shape_knob(source_model, k) != _shape_knob(cfg.model, k)}
    if FAMILY[cfg.model.family].learned_positions and source_model.seq_len != cfg.model.seq_len:
        diff["seq_len"] = (source_model.seq_len, cfg.model.seq_len)  # the learned position table's shape
    if diff:
        raise ConfigError(f"init_from {source.path} has a different model: "
                          + ", ".join(f"{k} {a} (there) != {b} (here)" for k, (a, b) in diff.items()))
    with Checkpointer(source.checkpoint_dir) as ckpt:
        return ckpt.resolve_step(None if cfg.init_from_step < 0 else cfg.init_from_step)


def _shape_knob(model: ConfigDict, key: str):
    """`model[key]`, with `mlp=""` read as the family's MLP (what it builds)."""
    return (model.mlp or FAMILY[model.family].mlp) if key == "mlp" else model[key]


def init_params_from(cfg: ConfigDict, abstract_params):
    """Parameters of checkpoint `cfg.init_from_step` of the run `cfg.init_from`, in the shardings and the layer
    layout (`cfg.model.scan_layers`) of `abstract_params`, whichever layout the init_from run trained in."""
    source = Workdir(cfg.init_from)
    with Checkpointer(source.checkpoint_dir) as ckpt:
        return restore_in_layout(ckpt, abstract_params, cfg.init_from_step, source.load_config().model.scan_layers,
                                 cfg.model.scan_layers)


def restore_in_layout(ckpt: Checkpointer, abstract_params, step: int, saved_scanned: bool, scanned: bool):
    """The params of checkpoint `step`, saved in one layer layout (`saved_scanned`: that run's model.scan_layers),
    in the layout `scanned` of `abstract_params` and its shardings. Across layouts they are restored as saved
    (each layer sharded as it will be) and stacked or unstacked by one jitted function, which holds both copies
    for a moment."""
    if saved_scanned == scanned:
        return ckpt.restore_params(abstract_params, step)
    params = ckpt.restore_params(_other_layout(abstract_params, to_stacked=saved_scanned), step)
    convert = stack_layers if scanned else unstack_layers
    return jax.jit(convert, out_shardings=jax.tree.map(lambda s: s.sharding, abstract_params))(params)


def _other_layout(abstract_params, to_stacked: bool):
    """Abstract params (ShapeDtypeStructs with shardings) of one layer layout in the other: stacked from
    unrolled (`to_stacked`; the layer axis unsharded) or unrolled from stacked (the layer axis dropped)."""
    blocks = abstract_params["blocks"]

    def layer(s: jax.ShapeDtypeStruct, shape: tuple[int, ...]) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, s.dtype, sharding=_layer_sharding(s.sharding, to_stacked))

    if to_stacked:
        blocks = jax.tree.map(lambda s: layer(s, (len(blocks), *s.shape)), blocks[0])
    else:
        num_layers = jax.tree.leaves(blocks)[0].shape[0]
        blocks = {i: jax.tree.map(lambda s: layer(s, s.shape[1:]), blocks) for i in range(num_layers)}
    return {**abstract_params, "blocks": blocks}


def _layer_sharding(sharding, to_stacked: bool):
    """A layer's sharding for its stack (a leading unsharded axis), or the stack's for one layer."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = tuple(sharding.spec)
    return NamedSharding(sharding.mesh, PartitionSpec(None, *spec) if to_stacked else PartitionSpec(*spec[1:]))

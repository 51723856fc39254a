"""What the config.json and weight names of Hugging Face GPT-2, Llama, Mistral and Qwen2 checkpoints mean in
lmjax's terms: the model config, and the tensors mapped onto lmjax's params with a check of their structure.

Weight layouts differ between the libraries: GPT-2's Conv1D stores [in, out] and fuses q/k/v into one
`c_attn`; Llama's Linear stores [out, in]. lmjax keeps heads as their own axis, e.g. the query
projection is [d_model, heads, head_dim] and the output projection [heads, head_dim, d_model].
"""

from collections.abc import Callable

import jax
import numpy as np
from ml_collections import ConfigDict

from lmjax.config import DataError, base_config
from lmjax.model.config import ModelConfig
from lmjax.model.params import Params, abstract_model

# Buffers that some (older) checkpoints save next to the weights; they carry no learned values.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


class _Tensors:
    """Checkpoint tensors by name; `take` hands each out once, checking its shape."""

    def __init__(self, tensors: dict[str, np.ndarray], prefix: str):
        self.tensors = {}
        for name, value in tensors.items():
            if name.endswith(_IGNORED_SUFFIXES):
                continue
            self.tensors[name.removeprefix(prefix)] = value
        self.used: set[str] = set()

    def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.tensors:
            raise DataError(f"checkpoint is missing tensor {name!r}")
        value = self.tensors[name]
        if tuple(value.shape) != tuple(shape):
            raise DataError(f"checkpoint tensor {name!r} has shape {tuple(value.shape)}, "
                             f"expected {tuple(shape)}")
        self.used.add(name)
        return np.asarray(value, np.float32)

    def has(self, name: str) -> bool:
        return name in self.tensors

    def discard(self, name: str) -> None:
        self.used.add(name)

    def check_all_used(self) -> None:
        extra = sorted(set(self.tensors) - self.used)
        if extra:
            shown = ", ".join(repr(n) for n in extra[:5]) + (" ..." if len(extra) > 5 else "")
            raise DataError(f"checkpoint has {len(extra)} unexpected tensor(s): {shown}")


def _get(hf: dict, key: str, default: int | None = None) -> int:
    """A size from config.json: a positive integer (`default` when absent or null, if given)."""
    value = hf.get(key)
    if value is None:
        if default is not None:
            return default
        raise DataError(f"config.json has no {key!r}")
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise DataError(f"config.json {key!r} must be a positive integer, got {value!r}")
    return value


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise DataError(f"unsupported checkpoint: {message}")


def _gpt2_config(hf: dict) -> ConfigDict:
    act = hf.get("activation_function", "gelu_new")
    _require(act in ("gelu_new", "gelu_pytorch_tanh"), f"gpt2 activation_function {act!r} (need gelu_new)")
    _require(hf.get("scale_attn_weights", True), "gpt2 with scale_attn_weights=False")
    _require(not hf.get("scale_attn_by_inverse_layer_idx", False), "gpt2 scale_attn_by_inverse_layer_idx")
    _require(not hf.get("add_cross_attention", False), "gpt2 with cross-attention")
    cfg = base_config().model
    d, h = _get(hf, "n_embd"), _get(hf, "n_head")
    _require(d % h == 0, f"gpt2 n_embd {d} not divisible by n_head {h}")
    cfg.family = "gpt2"
    cfg.vocab_size = _get(hf, "vocab_size")
    cfg.num_layers = _get(hf, "n_layer")
    cfg.num_heads = cfg.num_kv_heads = h
    cfg.head_dim = d // h
    cfg.d_model = d
    cfg.d_ff = _get(hf, "n_inner", 4 * d)
    cfg.seq_len = _get(hf, "n_positions")
    cfg.norm_eps = float(hf.get("layer_norm_epsilon", 1e-5))
    cfg.tie_embeddings = bool(hf.get("tie_word_embeddings", True))
    cfg.dropout = 0.0
    return cfg


def _llama_config(hf: dict) -> ConfigDict:
    act = hf.get("hidden_act", "silu")
    _require(act == "silu", f"llama hidden_act {act!r} (need silu)")
    _require(not hf.get("attention_bias", False), "llama with attention_bias=True")
    _require(not hf.get("mlp_bias", False), "llama with mlp_bias=True")
    rope = hf.get("rope_parameters") or {}
    scaling = {}
    for key in ("rope_scaling", "rope_parameters"):
        spec = hf.get(key) or {}
        kind = spec.get("rope_type", spec.get("type", "default"))
        _require(kind in ("default", "llama3"), f"llama {key} of type {kind!r} (plain RoPE or llama3 only)")
        if kind == "llama3":
            scaling = spec
    cfg = base_config().model
    if scaling:
        missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                   if k not in scaling]
        _require(not missing, f"llama3 RoPE scaling without {missing}")
        cfg.rope_scaling = "llama3"
        cfg.rope_factor = float(scaling["factor"])
        cfg.rope_low_freq_factor = float(scaling["low_freq_factor"])
        cfg.rope_high_freq_factor = float(scaling["high_freq_factor"])
        cfg.rope_original_context = int(scaling["original_max_position_embeddings"])
    d, h = _get(hf, "hidden_size"), _get(hf, "num_attention_heads")
    cfg.family = "llama"
    cfg.vocab_size = _get(hf, "vocab_size")
    cfg.num_layers = _get(hf, "num_hidden_layers")
    cfg.num_heads = h
    cfg.num_kv_heads = _get(hf, "num_key_value_heads", h)
    cfg.head_dim = _get(hf, "head_dim", d // h)
    cfg.d_model = d
    cfg.d_ff = _get(hf, "intermediate_size")
    cfg.seq_len = _get(hf, "max_position_embeddings")
    cfg.norm_eps = float(hf.get("rms_norm_eps", 1e-6))
    cfg.rope_theta = float(rope.get("rope_theta") or hf.get("rope_theta") or 10000.0)
    cfg.tie_embeddings = bool(hf.get("tie_word_embeddings", False))
    cfg.dropout = 0.0
    return cfg


def _mistral_config(hf: dict) -> ConfigDict:
    """Mistral is Llama's layout plus an optional sliding attention window; lmjax has no windowed attention,
    so the context is capped at the window, within which both attend to the same keys."""
    cfg = _llama_config(hf)
    window = hf.get("sliding_window")
    if window is not None:
        cfg.seq_len = min(cfg.seq_len, _get(hf, "sliding_window"))
    return cfg


def _qwen2_config(hf: dict) -> ConfigDict:
    """Qwen2/2.5 is Llama's layout with biases on the query, key and value projections. Its sliding window
    (off in the released models) is refused: lmjax has no windowed attention."""
    _require(not hf.get("use_sliding_window", False), "qwen2 with use_sliding_window=True")
    cfg = _llama_config({**hf, "attention_bias": False})
    cfg.qkv_bias = True
    return cfg


def _gpt2_params(cfg: ConfigDict, t: _Tensors) -> Params:
    d, h, hd, f, v = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
    blocks = {}
    for i in range(cfg.num_layers):
        p = f"h.{i}."
        qkv = t.take(p + "attn.c_attn.weight", (d, 3 * d))
        qkv_bias = t.take(p + "attn.c_attn.bias", (3 * d,))
        q, k, v_ = (w.reshape(d, h, hd) for w in np.split(qkv, 3, axis=1))
        qb, kb, vb = (b.reshape(h, hd) for b in np.split(qkv_bias, 3))
        blocks[i] = {
            "attn_norm": {"scale": t.take(p + "ln_1.weight", (d,)), "bias": t.take(p + "ln_1.bias", (d,))},
            "attn": {
                "query": q, "key": k, "value": v_,
                "query_bias": qb, "key_bias": kb, "value_bias": vb,
                "out": t.take(p + "attn.c_proj.weight", (d, d)).reshape(h, hd, d),
                "out_bias": t.take(p + "attn.c_proj.bias", (d,)),
            },
            "mlp_norm": {"scale": t.take(p + "ln_2.weight", (d,)), "bias": t.take(p + "ln_2.bias", (d,))},
            "mlp": {
                "fc_in": t.take(p + "mlp.c_fc.weight", (d, f)),
                "fc_in_bias": t.take(p + "mlp.c_fc.bias", (f,)),
                "fc_out": t.take(p + "mlp.c_proj.weight", (f, d)),
                "fc_out_bias": t.take(p + "mlp.c_proj.bias", (d,)),
            },
        }
    params = {
        "embed": pad_vocab(cfg, t.take("wte.weight", (v, d)), axis=0),
        "pos_embed": t.take("wpe.weight", (cfg.seq_len, d)),
        "blocks": blocks,
        "final_norm": {"scale": t.take("ln_f.weight", (d,)), "bias": t.take("ln_f.bias", (d,))},
    }
    _take_lm_head(cfg, t, params)
    return params


def _llama_params(cfg: ConfigDict, t: _Tensors) -> Params:
    d, h, kv, hd, f, v = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
    blocks = {}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        biases = {f"{name}_bias": t.take(p + f"self_attn.{hf_name}_proj.bias", (n * hd,)).reshape(n, hd)
                  for name, hf_name, n in (("query", "q", h), ("key", "k", kv), ("value", "v", kv))} \
            if cfg.qkv_bias else {}
        blocks[i] = {
            "attn_norm": {"scale": t.take(p + "input_layernorm.weight", (d,))},
            "attn": {
                "query": t.take(p + "self_attn.q_proj.weight", (h * hd, d)).T.reshape(d, h, hd),
                "key": t.take(p + "self_attn.k_proj.weight", (kv * hd, d)).T.reshape(d, kv, hd),
                "value": t.take(p + "self_attn.v_proj.weight", (kv * hd, d)).T.reshape(d, kv, hd),
                "out": t.take(p + "self_attn.o_proj.weight", (d, h * hd)).T.reshape(h, hd, d),
                **biases,
            },
            "mlp_norm": {"scale": t.take(p + "post_attention_layernorm.weight", (d,))},
            "mlp": {
                "gate": t.take(p + "mlp.gate_proj.weight", (f, d)).T,
                "up": t.take(p + "mlp.up_proj.weight", (f, d)).T,
                "down": t.take(p + "mlp.down_proj.weight", (d, f)).T,
            },
        }
    params = {
        "embed": pad_vocab(cfg, t.take("embed_tokens.weight", (v, d)), axis=0),
        "blocks": blocks,
        "final_norm": {"scale": t.take("norm.weight", (d,))},
    }
    _take_lm_head(cfg, t, params)
    return params


def _take_lm_head(cfg: ConfigDict, t: _Tensors, params: Params) -> None:
    """Untied: lm_head.weight [vocab, d_model] -> lm_head [d_model, vocab]. Tied: a saved copy is dropped."""
    if cfg.tie_embeddings:
        if t.has("lm_head.weight"):
            t.discard("lm_head.weight")
        return
    params["lm_head"] = pad_vocab(cfg, t.take("lm_head.weight", (cfg.vocab_size, cfg.d_model)).T, axis=1)


def pad_vocab(cfg: ConfigDict, x: np.ndarray, axis: int) -> np.ndarray:
    """`x` with zeros appended along its vocabulary `axis` up to the model's padded vocabulary."""
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, ModelConfig.from_config(cfg).padded_vocab - x.shape[axis])
    return np.pad(x, widths)


def _shapes(tree) -> dict[str, tuple[int, ...]]:
    """{"blocks.0.attn.query": shape} of every leaf."""
    return {jax.tree_util.keystr(path, simple=True, separator="."): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_structure(params: Params, expected: Params) -> None:
    """Raises ValueError naming the first parameter that is missing, extra or mis-shaped."""
    got, want = _shapes(params), _shapes(expected)
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing:
        raise ValueError(f"converted params are missing {missing[0]!r}")
    if extra:
        raise ValueError(f"converted params have unexpected {extra[0]!r}")
    for name, shape in sorted(want.items()):
        if got[name] != shape:
            raise ValueError(f"converted param {name!r} has shape {got[name]}, expected {shape}")


_ARCHITECTURES: dict[str, tuple[Callable, Callable, str]] = {
    "gpt2": (_gpt2_config, _gpt2_params, "transformer."),
    "llama": (_llama_config, _llama_params, "model."),
    "mistral": (_mistral_config, _llama_params, "model."),
    "qwen2": (_qwen2_config, _llama_params, "model."),
}
MODEL_TYPES = frozenset(_ARCHITECTURES)  # the config.json `model_type`s that can be imported


def model_config(hf: dict) -> ConfigDict:
    """lmjax's model config for the config.json `hf`, whose `model_type` is one of `MODEL_TYPES`. Raises DataError
    for missing or invalid sizes and unsupported features."""
    return _ARCHITECTURES[hf["model_type"]][0](hf)


def model_params(cfg: ConfigDict, model_type: str, tensors: dict[str, np.ndarray]) -> Params:
    """The checkpoint `tensors` of a `model_type` model as float32 params of `abstract_model(cfg)`, the embedding
    (and an untied lm_head) padded with zeros to the padded vocabulary. Raises DataError for missing, extra or
    mis-shaped tensors."""
    make_params, prefix = _ARCHITECTURES[model_type][1:]
    t = _Tensors(tensors, prefix)
    params = make_params(cfg, t)
    t.check_all_used()
    _check_structure(params, abstract_model(cfg)[1])
    return params

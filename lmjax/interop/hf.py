"""Import Hugging Face GPT-2, Llama, Mistral and Qwen2 checkpoints (config.json + safetensors) as lmjax config
and params, and as a run directory with their tokenizer (`lmjax import hf`).

Weight layouts differ between the libraries: GPT-2's Conv1D stores [in, out] and fuses q/k/v into one
`c_attn`; Llama's Linear stores [out, in]. lmjax keeps heads as their own axis, e.g. the query
projection is [d_model, heads, head_dim] and the output projection [heads, head_dim, d_model].
"""

import json
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict
from safetensors.numpy import load_file

from lmjax.config import DTYPES, DataError, base_config, validate
from lmjax.model.config import ModelConfig
from lmjax.model.params import Params, abstract_model
from lmjax.run.checkpoint import Checkpointer
from lmjax.run.workdir import Workdir
from lmjax.text.chat_template import JINJA_TEMPLATE
from lmjax.text.hf_tokenizer import TOKENIZER_FILE, HFTokenizer
from lmjax.text.io import new_directory
from lmjax.text.tokenizer import MODEL_FILE, SPECIAL_TOKENS, Tokenizer

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


def load_hf_checkpoint(path: str | Path, dtype: str = "float32") -> tuple[ConfigDict, Params]:
    """Reads a Hugging Face GPT2LMHeadModel, LlamaForCausalLM or MistralForCausalLM directory.

    Returns (model config, params): params match `abstract_model(cfg)` in structure and shape, stored in
    `dtype`, which also becomes the model's compute and parameter dtype. The embedding (and an untied
    lm_head) gets zeros for the padding ids up to a multiple of `model.vocab_multiple`, whose logits the
    model masks: compare logits[..., :vocab_size] with Hugging Face's. Raises DataError for missing or
    corrupt files, unsupported architectures or features, and missing, extra or mis-shaped tensors.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    path = Path(path)
    hf = _read_config(path)
    model_type = hf.get("model_type")
    builders: dict[str, tuple[Callable, Callable, str]] = {
        "gpt2": (_gpt2_config, _gpt2_params, "transformer."),
        "llama": (_llama_config, _llama_params, "model."),
        "mistral": (_mistral_config, _llama_params, "model."),
        "qwen2": (_qwen2_config, _llama_params, "model."),
    }
    if model_type not in builders:
        raise DataError(f"unsupported model_type {model_type!r} in {path / 'config.json'}; "
                         f"supported: {sorted(builders)}")
    make_config, make_params, prefix = builders[model_type]
    cfg = make_config(hf)
    cfg.dtype = cfg.param_dtype = dtype
    full = base_config()
    full.model = cfg
    validate(full)

    tensors = _Tensors(_read_tensors(path), prefix)
    params = make_params(cfg, tensors)
    tensors.check_all_used()
    _check_structure(params, abstract_model(cfg)[1])
    param_dtype = jnp.dtype(dtype)
    params = _map(lambda x: np.ascontiguousarray(x).astype(param_dtype), params)
    return cfg, params


def import_hf(source: str | Path, workdir: str | Path, dtype: str = "float32") -> Path:
    """Writes the Hugging Face directory `source` as a new run directory `workdir` (config, tokenizer, one
    params-only checkpoint at step 0) that sample, chat, demo, serve and `train --config.init_from` use.

    The tokenizer is `load_hf_tokenizer`'s; when it has more tokens than the model (chat markers added to a model
    without a chat template), the embedding (and an untied output layer) grows by rows set to the mean of the
    existing ones, a start that makes the new tokens as likely as an average token rather than arbitrary."""
    with new_directory(workdir) as staging:
        source = resolve_source(source)
        model_cfg, params = load_hf_checkpoint(source, dtype)
        tokenizer = load_hf_tokenizer(source)
        if isinstance(tokenizer, Tokenizer) and tokenizer.vocab_size != model_cfg.vocab_size:
            raise DataError(f"{source}: the tokenizer has {tokenizer.vocab_size} pieces but the model's vocab_size "
                            f"is {model_cfg.vocab_size}")
        if tokenizer.vocab_size > model_cfg.vocab_size:
            params = grow_vocab(model_cfg, params, tokenizer.vocab_size)
            model_cfg.vocab_size = tokenizer.vocab_size
        cfg = base_config()
        cfg.model = model_cfg
        cfg.tokenizer.vocab_size = tokenizer.vocab_size
        validate(cfg)
        wd = Workdir(staging)
        wd.save_config(cfg)
        tokenizer.save(wd.tokenizer_dir)
        with Checkpointer(wd.checkpoint_dir) as ckpt:
            ckpt.save_params(0, params)
    return Path(workdir)


def resolve_source(source: str | Path) -> Path:
    """`source` if it is a directory; else a Hugging Face hub model id, downloaded (config, safetensors and
    tokenizer files only) to the hub's cache."""
    if Path(source).is_dir():
        return Path(source)
    if str(source).count("/") != 1 or str(source).startswith((".", "/")):
        raise DataError(f"Hugging Face checkpoint directory not found: {source}")
    import huggingface_hub  # only for hub ids: installed with `tokenizers`

    try:
        return Path(huggingface_hub.snapshot_download(str(source), allow_patterns=[
            "*.json", "*.safetensors", "tokenizer.model", "*.jinja"]))
    except Exception as e:
        raise DataError(f"{source} is not a local directory and could not be downloaded from the Hugging Face hub: "
                        f"{type(e).__name__}: {e}") from None


def load_hf_tokenizer(source: str | Path) -> Tokenizer | HFTokenizer:
    """The tokenizer of the Hugging Face directory `source`: lmjax's SentencePiece `tokenizer.model` when it is
    one (as `lmjax export hf` writes), else `tokenizer.json` with the model's chat template. A tokenizer without a
    template gets lmjax's (`JINJA_TEMPLATE`), its markers added as special tokens."""
    source = Path(source)
    if (source / MODEL_FILE).is_file():
        try:
            return Tokenizer.load(source)
        except DataError as e:
            if not (source / TOKENIZER_FILE).is_file():
                raise DataError(f"{source} has a tokenizer.model that lmjax cannot use ({e}) and no tokenizer.json; "
                                "save the tokenizer with `transformers` (`AutoTokenizer.save_pretrained`) to get "
                                "one") from None
    if not (source / TOKENIZER_FILE).is_file():
        raise DataError(f"no tokenizer in {source} (expected tokenizer.json, or lmjax's tokenizer.model)")
    tokenizer = HFTokenizer.load(source, _read_config(source) if (source / "config.json").is_file() else {})
    if tokenizer.chat_template is None:
        tokenizer = tokenizer.with_chat_template(JINJA_TEMPLATE, SPECIAL_TOKENS)
    return tokenizer


def grow_vocab(cfg: ConfigDict, params: Params, vocab_size: int) -> Params:
    """`params` of a model with `cfg.vocab_size` tokens extended to `vocab_size`: each new embedding row (and
    untied output column) is the mean of the existing ones."""
    old = cfg.vocab_size
    grown = ConfigDict(cfg.to_dict())
    grown.vocab_size = vocab_size

    def extend(x: np.ndarray, axis: int) -> np.ndarray:
        x = np.take(np.asarray(x), np.arange(old), axis=axis)
        mean = x.astype(np.float32).mean(axis=axis, keepdims=True).astype(x.dtype)
        return _pad_vocab(grown, np.concatenate([x, np.repeat(mean, vocab_size - old, axis=axis)], axis=axis), axis)

    params = dict(params)
    params["embed"] = extend(params["embed"], 0)
    if "lm_head" in params:
        params["lm_head"] = extend(params["lm_head"], 1)
    return params


def _read_config(path: Path) -> dict:
    if not path.is_dir():
        raise DataError(f"Hugging Face checkpoint directory not found: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise DataError(f"no config.json in {path}")
    try:
        hf = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{config_file} is not valid JSON: {e}") from e
    if not isinstance(hf, dict):
        raise DataError(f"{config_file} does not hold a JSON object")
    return hf


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of model.safetensors, or of the shards listed in model.safetensors.index.json."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return _load_safetensors(single)
    if not index.is_file():
        raise DataError(f"no model.safetensors or model.safetensors.index.json in {path} "
                         "(only safetensors checkpoints are supported)")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{index} is not a valid safetensors index: {e}") from e
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        for name, value in _load_safetensors(path / shard).items():
            if name in tensors:
                raise DataError(f"tensor {name!r} appears in more than one shard of {path}")
            tensors[name] = value
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise DataError(f"tensor {missing[0]!r} is listed in {index} but not found in its shard")
    return tensors


def _load_safetensors(file: Path) -> dict[str, np.ndarray]:
    if not file.is_file():
        raise DataError(f"safetensors file not found: {file}")
    try:
        return load_file(file)
    except Exception as e:
        raise DataError(f"cannot read safetensors file {file}: {type(e).__name__}: {e}") from e


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
        "embed": _pad_vocab(cfg, t.take("wte.weight", (v, d)), axis=0),
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
        "embed": _pad_vocab(cfg, t.take("embed_tokens.weight", (v, d)), axis=0),
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
    params["lm_head"] = _pad_vocab(cfg, t.take("lm_head.weight", (cfg.vocab_size, cfg.d_model)).T, axis=1)


def _pad_vocab(cfg: ConfigDict, x: np.ndarray, axis: int) -> np.ndarray:
    """`x` with zeros appended along its vocabulary `axis` up to the model's padded vocabulary."""
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, ModelConfig.from_config(cfg).padded_vocab - x.shape[axis])
    return np.pad(x, widths)


def _map(fn: Callable, tree):
    if isinstance(tree, dict):
        return {k: _map(fn, v) for k, v in tree.items()}
    return fn(tree)


def _flatten(tree, prefix: str = "") -> dict[str, tuple[int, ...]]:
    if not isinstance(tree, dict):
        return {prefix: tuple(tree.shape)}
    flat = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}" if not prefix else f"{prefix}.{key}"))
    return flat


def _check_structure(params: Params, expected: Params) -> None:
    """Raises ValueError naming the first parameter that is missing, extra or mis-shaped."""
    got, want = _flatten(params), _flatten(expected)
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing:
        raise ValueError(f"converted params are missing {missing[0]!r}")
    if extra:
        raise ValueError(f"converted params have unexpected {extra[0]!r}")
    for name, shape in sorted(want.items()):
        if got[name] != shape:
            raise ValueError(f"converted param {name!r} has shape {got[name]}, expected {shape}")

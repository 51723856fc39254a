"""Import Hugging Face GPT-2, Llama, Mistral and Qwen2 checkpoint directories (config.json + safetensors) as
lmjax config and params, and as a run directory with their tokenizer (`lmjax import hf`). This module reads the
files; lmjax/interop/hf_layout.py maps each architecture's config and weights onto lmjax's.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict
from safetensors.numpy import load_file

from lmjax.config import DTYPES, DataError, base_config, validate
from lmjax.interop.hf_layout import MODEL_TYPES, model_config, model_params, pad_vocab
from lmjax.model.params import Params
from lmjax.run.checkpoint import Checkpointer
from lmjax.run.workdir import Workdir
from lmjax.text.chat_template import JINJA_TEMPLATE
from lmjax.text.hf_tokenizer import TOKENIZER_FILE, HFTokenizer
from lmjax.text.io import new_directory
from lmjax.text.tokenizer import MODEL_FILE, SPECIAL_TOKENS, Tokenizer


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
    if model_type not in MODEL_TYPES:
        raise DataError(f"unsupported model_type {model_type!r} in {path / 'config.json'}; "
                         f"supported: {sorted(MODEL_TYPES)}")
    cfg = model_config(hf)
    cfg.dtype = cfg.param_dtype = dtype
    full = base_config()
    full.model = cfg
    validate(full)

    params = model_params(cfg, model_type, _read_tensors(path))
    param_dtype = jnp.dtype(dtype)
    params = jax.tree.map(lambda x: np.ascontiguousarray(x).astype(param_dtype), params)
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
        return pad_vocab(grown, np.concatenate([x, np.repeat(mean, vocab_size - old, axis=axis)], axis=axis), axis)

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

"""Export an lmjax run as a Hugging Face checkpoint directory (GPT2LMHeadModel, LlamaForCausalLM or, with
query/key/value biases, Qwen2ForCausalLM).

The inverse of lmjax/interop/hf_layout.py: lmjax's per-head layouts go back to GPT-2's fused [in, out] Conv1D and
Llama's [out, in] Linear weights, the vocabulary padding is cut off, and a tied embedding is saved once
(`tie_word_embeddings`). The directory holds `config.json`, the weights (`model.safetensors`, or shards with
`model.safetensors.index.json` above `max_shard_bytes`), `generation_config.json` and the run's tokenizer with
its chat template, so that `AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)`
load it without lmjax: a Hugging Face tokenizer as it was imported; lmjax's SentencePiece model as
`tokenizer.model` with a `LlamaTokenizer` `tokenizer_config.json` (transformers builds the fast tokenizer from
it) and lmjax's template in Jinja.

A LoRA run exports merged, or as its base plus a PEFT adapter (`peft_adapter`).
"""

import json
import shutil
from pathlib import Path

import jax
import numpy as np
from ml_collections import ConfigDict
from safetensors.numpy import save_file

from lmjax.config import ConfigError
from lmjax.model.config import FAMILY, ModelConfig
from lmjax.model.lora import LoraSpec, LoraWeight, merge
from lmjax.model.params import Params
from lmjax.run.restore import restore_model
from lmjax.run.workdir import open_workdir
from lmjax.text.chat_template import JINJA_TEMPLATE
from lmjax.text.hf_tokenizer import HFTokenizer
from lmjax.text.io import new_directory
from lmjax.text.tokenizer import Tokenizer

MAX_SHARD_BYTES = 5 * 2**30  # weights above this are split into shards (the size Hugging Face's hub favours)

SPECIAL_PIECES = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


def hf_config(cfg: ModelConfig, tokenizer: Tokenizer | HFTokenizer) -> dict:
    """config.json of the Hugging Face model with `cfg`'s shapes and `tokenizer`'s bos/eos/pad ids."""
    custom = {"model.mlp": cfg.mlp != FAMILY[cfg.family].mlp, "model.qk_norm": cfg.qk_norm,
              "model.logit_softcap": cfg.logit_softcap > 0}
    if any(custom.values()):
        raise ConfigError(f"{', '.join(k for k, v in custom.items() if v)} changes the {cfg.family} architecture: "
                          f"no Hugging Face {cfg.family} class computes it, so the model cannot be exported")
    common = {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
              "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id,
              "torch_dtype": "float32"}
    if cfg.family == "gpt2":
        if cfg.head_dim * cfg.num_heads != cfg.d_model:
            raise ConfigError("GPT-2 needs head_dim x num_heads == d_model to export")
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": cfg.d_model,
                "n_layer": cfg.num_layers, "n_head": cfg.num_heads, "n_inner": cfg.d_ff,
                "n_positions": cfg.seq_len, "layer_norm_epsilon": cfg.norm_eps,
                "activation_function": "gelu_new", **common}
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "llama3":
        rope.update(rope_type="llama3", factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                    high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_context)
    llama = {"hidden_size": cfg.d_model, "rope_parameters": rope,
             "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
             "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.d_ff,
             "max_position_embeddings": cfg.seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
             "hidden_act": "silu", **common}
    if cfg.qkv_bias:
        if cfg.rope_scaling:
            raise ConfigError("a model with qkv_bias (Qwen2) and llama3 RoPE scaling has no Hugging Face class")
        return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": False, **llama}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
            "mlp_bias": False, **llama}


def hf_tensors(cfg: ModelConfig, params: Params) -> dict[str, np.ndarray]:
    """The Hugging Face state dict (float32 numpy) of lmjax `params`."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float32), jax.device_get(params))
    v, d = cfg.vocab_size, cfg.d_model
    out: dict[str, np.ndarray] = {}
    if cfg.family == "gpt2":
        for i, block in p["blocks"].items():
            a, m, pre = block["attn"], block["mlp"], f"transformer.h.{i}."
            out[pre + "attn.c_attn.weight"] = np.concatenate([a[k].reshape(d, -1) for k in ("query", "key", "value")],
                                                             axis=1)
            out[pre + "attn.c_attn.bias"] = np.concatenate([a[k].reshape(-1) for k in
                                                            ("query_bias", "key_bias", "value_bias")])
            out[pre + "attn.c_proj.weight"] = a["out"].reshape(-1, d)
            out[pre + "attn.c_proj.bias"] = a["out_bias"]
            for norm, name in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                out[pre + f"{name}.weight"] = block[norm]["scale"]
                out[pre + f"{name}.bias"] = block[norm]["bias"]
            out[pre + "mlp.c_fc.weight"], out[pre + "mlp.c_fc.bias"] = m["fc_in"], m["fc_in_bias"]
            out[pre + "mlp.c_proj.weight"], out[pre + "mlp.c_proj.bias"] = m["fc_out"], m["fc_out_bias"]
        out["transformer.wte.weight"] = p["embed"][:v]
        out["transformer.wpe.weight"] = p["pos_embed"]
        out["transformer.ln_f.weight"] = p["final_norm"]["scale"]
        out["transformer.ln_f.bias"] = p["final_norm"]["bias"]
    else:
        for i, block in p["blocks"].items():
            a, m, pre = block["attn"], block["mlp"], f"model.layers.{i}."
            for name, key in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
                out[pre + f"self_attn.{name}.weight"] = a[key].reshape(d, -1).T
                if cfg.qkv_bias:
                    out[pre + f"self_attn.{name}.bias"] = a[f"{key}_bias"].reshape(-1)
            out[pre + "self_attn.o_proj.weight"] = a["out"].reshape(-1, d).T
            out[pre + "input_layernorm.weight"] = block["attn_norm"]["scale"]
            out[pre + "post_attention_layernorm.weight"] = block["mlp_norm"]["scale"]
            for name in ("gate", "up", "down"):
                out[pre + f"mlp.{name}_proj.weight"] = m[name].T
        out["model.embed_tokens.weight"] = p["embed"][:v]
        out["model.norm.weight"] = p["final_norm"]["scale"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = p["lm_head"][:, :v].T
    return {name: np.ascontiguousarray(x) for name, x in out.items()}


# Hugging Face module of each lmjax projection, under the layer prefix. GPT-2's query, key and value share the
# fused `attn.c_attn` (see `peft_adapter`).
HF_LAYERS = {"gpt2": "transformer.h", "llama": "model.layers"}
HF_MODULES = {
    "gpt2": {"query": "attn.c_attn", "key": "attn.c_attn", "value": "attn.c_attn", "out": "attn.c_proj",
             "fc_in": "mlp.c_fc", "fc_out": "mlp.c_proj"},
    "llama": {"query": "self_attn.q_proj", "key": "self_attn.k_proj", "value": "self_attn.v_proj",
              "out": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"},
}


def peft_adapter(cfg: ModelConfig, lora: LoraSpec, params: Params, base_dir: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(adapter_config.json, adapter_model.safetensors tensors) of the `LoraWeight`s in `params`, in PEFT's LoRA
    format: per Hugging Face module `lora_A.weight` [r, in] and `lora_B.weight` [out, r] with scale lora_alpha / r.

    GPT-2 fuses query, key and value into one Conv1D, `c_attn` [d, 3d], while lmjax adapts them separately. The
    fused module gets one exact adapter of rank n x r for its n adapted parts: A stacks their A's and B is block
    diagonal (each part's B in its own output rows and rank columns), so B A x = [B_q A_q x; B_k A_k x; B_v A_v x];
    its rank and alpha are n x r and n x alpha (`rank_pattern`, `alpha_pattern`), keeping PEFT's scale."""
    modules: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for i, block in params["blocks"].items():
        for part in ("attn", "mlp"):
            for name, w in block[part].items():
                if isinstance(w, LoraWeight):
                    a, b = (np.asarray(jax.device_get(x), np.float32) for x in (w.a, w.b))
                    module = f"{HF_LAYERS[cfg.family]}.{i}.{HF_MODULES[cfg.family][name]}"
                    modules.setdefault(module, {})[name] = (a.reshape(-1, lora.rank).T, b.reshape(lora.rank, -1).T)
    tensors, rank_pattern, alpha_pattern = {}, {}, {}
    for module, parts in modules.items():
        if module.endswith("c_attn"):
            d = cfg.d_model
            lora_a = np.concatenate([a for a, _ in parts.values()])
            lora_b = np.zeros((3 * d, lora_a.shape[0]), np.float32)
            for j, (name, (_, b)) in enumerate(parts.items()):
                row = ("query", "key", "value").index(name) * d
                lora_b[row:row + d, j * lora.rank:(j + 1) * lora.rank] = b
            rank_pattern[module], alpha_pattern[module] = len(parts) * lora.rank, len(parts) * lora.alpha
        else:
            (lora_a, lora_b), = parts.values()
        tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(lora_a)
        tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(lora_b)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_dir, "r": lora.rank,
              "lora_alpha": lora.alpha, "lora_dropout": lora.dropout, "target_modules": sorted(modules),
              "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "bias": "none",
              "fan_in_fan_out": cfg.family == "gpt2", "use_rslora": False, "use_dora": False,
              "init_lora_weights": True, "inference_mode": True, "modules_to_save": None}
    return config, tensors


def export_hf(workdir: str | Path, out: str | Path, step: int | None = None,
              max_shard_bytes: int = MAX_SHARD_BYTES, lora: str = "merged") -> Path:
    """Writes checkpoint `step` (default latest) of the run `workdir` as a Hugging Face directory `out`
    (`new_directory`: complete or absent; a non-empty `out` is refused). A LoRA run is written with its
    adapters merged into the weights (`lora="merged"`), or (`lora="adapter"`) as its base in `out` plus a PEFT
    adapter in `out/adapter` that `peft.PeftModel.from_pretrained(base model, out/adapter)` loads."""
    if lora not in ("merged", "adapter"):
        raise ConfigError(f"--lora must be merged or adapter, got {lora!r}")
    with new_directory(out) as staging:
        wd = open_workdir(workdir)
        saved: ConfigDict = wd.load_config()
        if saved.compress.quant or saved.compress.source:
            raise ConfigError(f"{wd.path} is a compressed run; export the float run it came from "
                              f"({saved.compress.source})")
        spec = LoraSpec.from_config(saved.train.lora)
        if lora == "adapter" and not spec.enabled:
            raise ConfigError(f"{wd.path} is not a LoRA run (train.lora.rank is 0): it has no adapter to export")
        cfg, _, params, tokenizer, step = restore_model(wd, step, merge_lora=lora == "merged")
        model_cfg = ModelConfig.from_config(cfg.model)
        if lora == "adapter":
            config, tensors = peft_adapter(model_cfg, spec, params, str(Path(out).absolute()))
            (staging / "adapter").mkdir()
            save_file(tensors, str(staging / "adapter" / "adapter_model.safetensors"), metadata={"format": "pt"})
            (staging / "adapter" / "adapter_config.json").write_text(json.dumps(config, indent=2))
            params = merge(params, adapters=False)
        save_weights(hf_tensors(model_cfg, params), staging, max_shard_bytes)
        (staging / "config.json").write_text(json.dumps(hf_config(model_cfg, tokenizer), indent=2))
        generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.stop_ids,
                      "pad_token_id": tokenizer.pad_id}
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2))
        if isinstance(tokenizer, HFTokenizer):
            tokenizer.save(staging)
        else:
            shutil.copy(wd.tokenizer_dir / "tokenizer.model", staging / "tokenizer.model")
            tokenizer_config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                                "add_prefix_space": False, "legacy": False, "model_max_length": model_cfg.seq_len,
                                "chat_template": JINJA_TEMPLATE, **SPECIAL_PIECES}
            (staging / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
            (staging / "special_tokens_map.json").write_text(json.dumps(SPECIAL_PIECES, indent=2))
        (staging / "lmjax_export.json").write_text(json.dumps({"workdir": str(wd.path.absolute()), "step": step}))
    return Path(out)


def save_weights(tensors: dict[str, np.ndarray], out: Path, max_shard_bytes: int) -> None:
    """`model.safetensors`, or shards of at most `max_shard_bytes` (a bigger tensor gets a shard of its own)
    named as Hugging Face names them, with `model.safetensors.index.json` mapping each tensor to its shard."""
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, x in tensors.items():
        if shards[-1] and size + x.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = x
        size += x.nbytes
    if len(shards) == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {"total_size": sum(x.nbytes for x in tensors.values())}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

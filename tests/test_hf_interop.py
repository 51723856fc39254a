"""Hugging Face import: logits parity with tiny random transformers models, and clear errors."""

import json
import shutil
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from lmjax.interop.hf import load_hf_checkpoint  # noqa: E402
from lmjax.model.params import abstract_model  # noqa: E402

VOCAB = 250  # lmjax pads it to 256 (model.vocab_multiple), with zeros in the imported weights
TOKENS = np.random.default_rng(0).integers(0, VOCAB, size=(2, 24))


def _gpt2() -> torch.nn.Module:
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _llama(tied: bool) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                   max_position_embeddings=64, tie_word_embeddings=tied,
                                   bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(cfg)


def _llama3() -> torch.nn.Module:
    """Llama 3.1's frequency scaling, with an original context short enough that all three bands occur."""
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                                   rope_parameters=rope, bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(cfg)


def _mistral() -> torch.nn.Module:
    cfg = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                                     sliding_window=None, bos_token_id=0, eos_token_id=0)
    return transformers.MistralForCausalLM(cfg)


def _qwen2() -> torch.nn.Module:
    """Qwen2.5-0.5B's layout: tied embeddings, grouped-query attention, biases on q/k/v only."""
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                                   tie_word_embeddings=True, rope_theta=1e6, bos_token_id=0, eos_token_id=0)
    return transformers.Qwen2ForCausalLM(cfg)


BUILDERS = {"gpt2": _gpt2, "llama": lambda: _llama(False), "llama_tied": lambda: _llama(True), "mistral": _mistral,
            "llama3_rope": _llama3, "qwen2": _qwen2}


def _save(name: str, directory: Path, **save_kwargs) -> torch.nn.Module:
    """Builds a seeded model, perturbs every weight (so biases and norm scales are not 0/1), saves it."""
    torch.manual_seed(0)
    model = BUILDERS[name]()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(directory, **save_kwargs)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, np.ndarray]]:
    """name -> (checkpoint directory, reference logits from transformers)."""
    out = {}
    for name in BUILDERS:
        directory = tmp_path_factory.mktemp(name)
        model = _save(name, directory)
        with torch.no_grad():
            logits = model(torch.from_numpy(TOKENS)).logits.numpy()
        out[name] = (directory, logits)
    return out


def _lmjax_logits(cfg, params) -> np.ndarray:
    graphdef = abstract_model(cfg)[0]
    model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, params))
    tokens = jnp.asarray(TOKENS, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits, _ = model(tokens, positions, jnp.ones_like(tokens))
    return np.asarray(logits)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_logits_match_transformers(checkpoints, name):
    directory, expected = checkpoints[name]
    cfg, params = load_hf_checkpoint(directory)
    assert cfg.family == {"mistral": "llama", "qwen2": "llama"}.get(name, name.split("_")[0].rstrip("3"))
    assert cfg.rope_scaling == ("llama3" if name == "llama3_rope" else "")
    assert cfg.tie_embeddings == (name in ("gpt2", "llama_tied", "qwen2"))
    assert cfg.qkv_bias == (name == "qwen2")
    assert ("lm_head" in params) == (not cfg.tie_embeddings)
    got = _lmjax_logits(cfg, params)
    assert got.shape == (*expected.shape[:-1], 256)
    assert np.abs(got[..., :VOCAB] - expected).max() <= 1e-5
    assert params["embed"].shape == (256, 64) and not params["embed"][VOCAB:].any()
    if "lm_head" in params:
        assert params["lm_head"].shape == (64, 256) and not params["lm_head"][:, VOCAB:].any()


def test_mistral_sliding_window_caps_the_context(checkpoints, tmp_path):
    directory = tmp_path / "ckpt"
    shutil.copytree(checkpoints["mistral"][0], directory)
    hf = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**hf, "sliding_window": 16}))
    assert load_hf_checkpoint(directory)[0].seq_len == 16
    assert load_hf_checkpoint(checkpoints["mistral"][0])[0].seq_len == 64


def test_config_fields(checkpoints):
    cfg, params = load_hf_checkpoint(checkpoints["llama"][0])
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (2, 4, 2, 16)
    assert (cfg.d_model, cfg.d_ff, cfg.seq_len, cfg.vocab_size) == (64, 128, 64, VOCAB)
    assert cfg.dropout == 0.0 and cfg.dtype == cfg.param_dtype == "float32"
    assert params["blocks"][1]["attn"]["key"].shape == (64, 2, 16)
    assert params["blocks"][1]["attn"]["key"].dtype == np.float32
    cfg, params = load_hf_checkpoint(checkpoints["gpt2"][0], dtype="bfloat16")
    assert cfg.dtype == cfg.param_dtype == "bfloat16"
    assert params["pos_embed"].shape == (64, 64) and params["pos_embed"].dtype == jnp.bfloat16


def test_sharded_checkpoint_loads_like_single_file(checkpoints, tmp_path):
    _save("llama", tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    _, sharded = load_hf_checkpoint(tmp_path)
    _, single = load_hf_checkpoint(checkpoints["llama"][0])
    jax.tree.map(np.testing.assert_array_equal, sharded, single)


def _edited_copy(source: Path, target: Path, edit) -> Path:
    """Copies a single-file checkpoint and rewrites its tensors with `edit(dict)`."""
    shutil.copytree(source, target)
    tensors = load_file(target / "model.safetensors")
    edit(tensors)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def test_missing_tensor(checkpoints, tmp_path):
    bad = _edited_copy(checkpoints["llama"][0], tmp_path / "ckpt",
                       lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor 'layers\.1\.mlp\.up_proj\.weight'"):
        load_hf_checkpoint(bad)


def test_mismatched_tensor(checkpoints, tmp_path):
    def edit(t):
        t["transformer.h.0.attn.c_attn.weight"] = np.zeros((64, 96), np.float32)

    bad = _edited_copy(checkpoints["gpt2"][0], tmp_path / "ckpt", edit)
    with pytest.raises(ValueError, match=r"'h\.0\.attn\.c_attn\.weight' has shape \(64, 96\)"):
        load_hf_checkpoint(bad)


def test_extra_tensor(checkpoints, tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.q_norm.weight"] = np.ones((16,), np.float32)

    bad = _edited_copy(checkpoints["llama"][0], tmp_path / "ckpt", edit)
    with pytest.raises(ValueError, match="unexpected tensor.*q_norm"):
        load_hf_checkpoint(bad)


def test_bad_directories(checkpoints, tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_hf_checkpoint(tmp_path / "nope")
    with pytest.raises(ValueError, match="no config.json"):
        load_hf_checkpoint(tmp_path)

    corrupt = tmp_path / "corrupt"
    shutil.copytree(checkpoints["gpt2"][0], corrupt)
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read safetensors"):
        load_hf_checkpoint(corrupt)
    (corrupt / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no model.safetensors"):
        load_hf_checkpoint(corrupt)
    (corrupt / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_hf_checkpoint(corrupt)


@pytest.mark.parametrize("name, change, message", [
    ("llama", {"model_type": "gemma"}, "unsupported model_type 'gemma'"),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "low_freq_factor"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0}}, "yarn"),
    ("llama", {"rope_scaling": {"type": "linear", "factor": 2.0}}, "linear"),
    ("llama", {"attention_bias": True}, "attention_bias"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ("gpt2", {"activation_function": "relu"}, "activation_function 'relu'"),
    ("qwen2", {"use_sliding_window": True}, "use_sliding_window"),
    ("gpt2", {"n_head": 0}, "n_head"),
])
def test_unsupported_configs(checkpoints, tmp_path, name, change, message):
    directory = tmp_path / "ckpt"
    shutil.copytree(checkpoints[name][0], directory)
    hf = json.loads((directory / "config.json").read_text())
    hf.update(change)
    (directory / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ValueError, match=message):
        load_hf_checkpoint(directory)

"""Hugging Face export: transformers loads an exported run with the same logits, import(export) is the
identity, and bad requests are refused."""

import json

import pytest

transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from lmjax.cli import main  # noqa: E402
from lmjax.compress.run import Compression, compress_run  # noqa: E402
from lmjax.config import ConfigError, base_config  # noqa: E402
from lmjax.interop.hf import load_hf_checkpoint  # noqa: E402
from lmjax.interop.hf_export import export_hf, hf_config  # noqa: E402
from lmjax.model.config import ModelConfig  # noqa: E402
from lmjax.model.params import init_params  # noqa: E402
from lmjax.run.checkpoint import Checkpointer  # noqa: E402
from lmjax.run.restore import restore_model  # noqa: E402
from lmjax.run.workdir import Workdir, open_workdir  # noqa: E402
from lmjax.text.tokenizer import Tokenizer  # noqa: E402

TOKENS = np.random.default_rng(0).integers(4, 500, size=(2, 20))


def random_run(path, tokenizer: Tokenizer, family: str, tied: bool, rope_scaling: str = "", qkv_bias: bool = False):
    """A run directory of a tiny model with random (perturbed) weights: biases and norm scales not 0/1."""
    cfg = base_config()
    cfg.model.update(family=family, vocab_size=tokenizer.vocab_size, num_layers=2, num_heads=4,
                     num_kv_heads=2 if family == "llama" else 0, d_model=64, d_ff=128, seq_len=32,
                     dtype="float32", tie_embeddings=tied, rope_scaling=rope_scaling, rope_original_context=16,
                     qkv_bias=qkv_bias)
    params = init_params(cfg.model, jax.random.PRNGKey(1))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape)
                                       for x, k in zip(leaves, keys, strict=True)])
    wd = Workdir(path)
    wd.path.mkdir(parents=True)
    wd.save_config(cfg)
    tokenizer.save(wd.tokenizer_dir)
    with Checkpointer(wd.checkpoint_dir) as ckpt:
        ckpt.save_params(7, params)
    return path


def lmjax_logits(run) -> np.ndarray:
    cfg, graphdef, params, _, _ = restore_model(open_workdir(run))
    tokens = jnp.asarray(TOKENS, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    logits, _ = nnx.merge(graphdef, params)(tokens, positions, jnp.ones_like(tokens))
    return np.asarray(logits[..., :cfg.model.vocab_size])


@pytest.mark.parametrize("family,tied,rope_scaling,qkv_bias", [
    ("llama", False, "", False), ("llama", True, "", False), ("gpt2", True, "", False),
    ("llama", False, "llama3", False), ("llama", True, "", True)])
def test_transformers_loads_an_export_with_the_same_logits(tmp_path, shared_tokenizer, family, tied, rope_scaling,
                                                           qkv_bias):
    run = random_run(tmp_path / "run", shared_tokenizer, family, tied, rope_scaling, qkv_bias)
    sharded = family == "llama" and not tied and not rope_scaling  # small shards: an index and several files
    out = export_hf(run, tmp_path / "hf", max_shard_bytes=100_000 if sharded else 2**30)
    assert json.loads((out / "config.json").read_text())["model_type"] == ("qwen2" if qkv_bias else family)
    assert (out / "model.safetensors.index.json").is_file() == sharded
    assert (len(list(out.glob("model-*-of-*.safetensors"))) > 1) == sharded
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = model(torch.from_numpy(TOKENS)).logits.numpy()
    assert np.abs(theirs - lmjax_logits(run)).max() < 1e-5
    cfg, params = load_hf_checkpoint(out)  # and back: the same parameters
    _, _, ours, _, _ = restore_model(open_workdir(run))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ours), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_export_cli_of_a_trained_run_and_its_tokenizer_files(trained_run, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["export", "hf", "--workdir", str(trained_run[0]), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "generation_config.json",
                                                "tokenizer.model", "tokenizer_config.json"}
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = model(torch.from_numpy(TOKENS)).logits.numpy()
    assert np.abs(theirs - lmjax_logits(trained_run[0])).max() < 1e-5
    tokenizer = Tokenizer.load(trained_run[0] / "tokenizer")
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"][0] == tokenizer.eos_id
    texts = ["def f(x):\n    return x * 2", "Hello, world!  Two  spaces", "  leading", "ünïcödé ✓ 中文", "a\tb\n\nc"]
    for use_fast in (False, True):
        theirs = transformers.AutoTokenizer.from_pretrained(out, use_fast=use_fast)
        for text in texts:
            assert theirs.encode(text, add_special_tokens=False) == tokenizer.encode(text), (use_fast, text)
        assert theirs.encode("x")[0] == tokenizer.bos_id


def test_bad_exports_are_refused(trained_run, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        export_hf(trained_run[0], taken)
    assert (taken / "keep.txt").read_text() == "mine"
    compressed = tmp_path / "int8"
    compress_run(trained_run[0], compressed, Compression(quant="int8"))
    with pytest.raises(ConfigError, match="compressed run"):
        export_hf(compressed, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8", "taken"]
    for knob in ("model.qk_norm=True", "model.mlp=relu2", "model.logit_softcap=30.0"):
        cfg = base_config()
        key, value = knob.removeprefix("model.").split("=")
        cfg.model[key] = type(cfg.model[key])(value == "True" if value in ("True", "False") else value)
        cfg.model.vocab_size = 64
        with pytest.raises(ConfigError, match=f"{knob.split('=')[0]} changes the llama architecture"):
            hf_config(ModelConfig.from_config(cfg.model), None)


def test_import_of_an_export_is_a_run_every_command_uses(trained_run, tmp_path, capsys):
    """export -> import gives a run with the same logits; sample runs on it and it can start a fine-tune."""
    hf_dir = export_hf(trained_run[0], tmp_path / "hf")
    run = tmp_path / "imported"
    assert main(["import", "hf", str(hf_dir), "--workdir", str(run)]) == 0
    np.testing.assert_allclose(lmjax_logits(run), lmjax_logits(trained_run[0]), atol=1e-5)
    assert main(["sample", "--workdir", str(run), "--prompt", "def", "--max-new-tokens", "4"]) == 0
    from lmjax.run.restore import check_init_from

    cfg = open_workdir(run).load_config()
    cfg.init_from = str(run)
    assert check_init_from(cfg) == 0
    assert main(["import", "hf", str(hf_dir), "--workdir", str(run)]) == 2  # never over an existing run
    (hf_dir / "tokenizer.model").unlink()
    assert main(["import", "hf", str(hf_dir), "--workdir", str(tmp_path / "x")]) == 2
    assert "no tokenizer in" in capsys.readouterr().err

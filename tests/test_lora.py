"""LoRA: the adapted projection, a trainer that differentiates and stores only the adapters, inference merged
and unmerged, `lmjax lora merge`, `lmjax plan`, the PEFT adapter export, and config errors."""

import ast
import dataclasses
import functools
import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import TINY_OVERRIDES, tiny_config, xla_cache_env
from flax import nnx

from lmjax.cli import main
from lmjax.compress.run import Compression, compress_run
from lmjax.config import ConfigError, apply_overrides, base_config, validate
from lmjax.eval.chat_qa import answer, qa_pairs, score
from lmjax.infer.sampler import Sampler
from lmjax.interop.hf import import_hf
from lmjax.interop.hf_export import export_hf
from lmjax.model.config import FAMILY, MLP_WEIGHTS, ModelConfig
from lmjax.model.lora import LoraSpec, LoraWeight, adapter_axes, attach, frozen_base, init_adapters, merge, target_paths
from lmjax.model.params import abstract_model, count_params, init_params
from lmjax.run.checkpoint import Checkpointer
from lmjax.run.restore import restore_model
from lmjax.run.workdir import Workdir, open_workdir
from lmjax.serve.engine import ChatEngine
from lmjax.text.chat_template import write_conversations
from lmjax.train.loop import train
from lmjax.train.plan import format_plan, plan
from lmjax.train.step import init_lora_state, lora_train_step

SPEC = LoraSpec(rank=4, alpha=8.0, targets=("query", "key", "value", "out", "mlp"))
TOKENS = jnp.asarray(np.random.default_rng(0).integers(4, 500, size=(2, 16)), jnp.int32)
HF_TOKENS = np.random.default_rng(0).integers(4, 500, size=(2, 20))


def tiny_model(family: str):
    cfg = base_config()
    cfg.model.update(family=family, vocab_size=512, num_layers=2, num_heads=4, num_kv_heads=2 if family == "llama"
                     else 0, d_model=32, d_ff=64, seq_len=16, dtype="float32")
    graphdef, _, _ = abstract_model(cfg.model)
    return cfg, graphdef, init_params(cfg.model, jax.random.PRNGKey(0))


def random_adapters(params, family: str, seed: int = 1):
    """Adapters with non-zero `b` (a trained adapter), so that they change the logits."""
    adapters = init_adapters(params, SPEC, FAMILY[family].mlp, jax.random.PRNGKey(seed))
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys, strict=True)])


def logits(graphdef, params, tokens=TOKENS) -> np.ndarray:
    tokens = jnp.asarray(tokens, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return np.asarray(nnx.merge(graphdef, params)(tokens, positions, jnp.ones_like(tokens))[0])


@pytest.mark.parametrize("family,base_dtype", [("llama", ""), ("gpt2", ""), ("llama", "int8")])
def test_merged_equals_unmerged_and_a_fresh_adapter_is_the_base(family, base_dtype):
    _, graphdef, params = tiny_model(family)
    base = frozen_base(params, base_dtype)
    fresh = attach(base, init_adapters(params, SPEC, FAMILY[family].mlp, jax.random.PRNGKey(1)), SPEC)
    np.testing.assert_array_equal(logits(graphdef, fresh), logits(graphdef, base))  # b = 0: exactly the base
    adapted = attach(base, random_adapters(params, family), SPEC)
    unmerged = logits(graphdef, adapted)
    assert np.abs(unmerged - logits(graphdef, base)).max() > 0.1
    np.testing.assert_allclose(logits(graphdef, merge(adapted)), unmerged, atol=2e-5)
    assert count_params(adapted) == count_params(params)


def test_targets_and_the_adapters_layout():
    _, _, params = tiny_model("llama")
    _, _, axes = abstract_model(tiny_model("llama")[0].model)
    adapters = init_adapters(params, SPEC, "swiglu", jax.random.PRNGKey(0))
    attn = adapters["blocks"][0]["attn"]
    assert attn["query"]["a"].shape == (32, 4) and attn["query"]["b"].shape == (4, 4, 8)
    assert attn["out"]["a"].shape == (4, 8, 4) and attn["out"]["b"].shape == (4, 32)
    assert set(adapters["blocks"][1]["mlp"]) == {"gate", "up", "down"}
    assert not np.any(np.asarray(attn["key"]["b"]))
    only = LoraSpec(rank=2, targets=(), target_regex="blocks/1/attn/(query|value)")
    assert [p[-1] for p in target_paths(params, only, "swiglu")] == ["query", "value"]
    lora_axes = adapter_axes(axes, adapters)["blocks"][0]["attn"]
    assert lora_axes["out"] == {"a": ("heads", "head_dim", "lora_rank"), "b": ("lora_rank", "embed")}


def test_lora_state_holds_and_updates_only_the_adapters():
    """The optimizer state is Adam's two moments of the adapters (not the base); after steps the adapters have
    moved and the base is bitwise what it was."""
    cfg, graphdef, params = tiny_model("llama")
    tx = optax.adamw(1e-2)
    state = init_lora_state(params, SPEC, "swiglu", tx, seed=0)
    n_adapters = count_params(state["params"])
    assert n_adapters < count_params(params) / 4
    moments = [x.size for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0]
    assert sum(moments) == 2 * n_adapters
    base_before = jax.tree.map(np.array, params)
    batch = {"inputs": TOKENS[None], "targets": jnp.roll(TOKENS, -1, axis=1)[None],
             "segment_ids": jnp.ones_like(TOKENS)[None],
             "positions": jnp.broadcast_to(jnp.arange(16), TOKENS.shape)[None]}
    step = jax.jit(functools.partial(lora_train_step, graphdef=graphdef, tx=tx, dropout=False,
                                     lora=dataclasses.replace(SPEC, dropout=0.1)))
    first = None
    for _ in range(5):
        state, metrics = step(state, params, batch)
        first = first if first is not None else float(metrics["loss"])
    assert float(metrics["loss"]) < first
    assert np.abs(np.asarray(state["params"]["blocks"][0]["attn"]["query"]["b"])).max() > 0
    for before, after in zip(jax.tree.leaves(base_before), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(before, np.asarray(after))


def conversations(items):
    return [[{"role": "user", "content": f"What is item {i}?"},
             {"role": "assistant", "content": f"Item {i} is a number."}] for i in items]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A tiny model pretrained for 300 steps, exported to Hugging Face and imported back (a run that `lmjax import
    hf` wrote). The session's 24-step run is too raw a base: with its embedding and head frozen, neither LoRA
    nor full-rank training of the projections alone learns the replies in tens of steps."""
    tmp = tmp_path_factory.mktemp("imported")
    train(tiny_config("train.steps=300", "train.eval_every=0", "train.ckpt_every=300", "train.log_every=100",
                      "train.samples="), tmp / "pretrained")
    return import_hf(export_hf(tmp / "pretrained", tmp / "hf"), tmp / "run")


def lora_config(base, data, heldout, *more: str):
    """The imported run's config with the tiny test runs' training knobs and a LoRA SFT on top."""
    tiny_train = [o for o in TINY_OVERRIDES if o.startswith("train.")]
    return apply_overrides(open_workdir(base).load_config(), tiny_train + lora_overrides(base, data, heldout)
                           + list(more))


def lora_overrides(base, data, heldout) -> list[str]:
    return [f"init_from={base}", f"data.train=chat:{data}", f"data.val=chat:{heldout}",
            "train.lora.rank=8", "train.lora.alpha=16", "train.lr=1e-2", "train.steps=30", "train.warmup_steps=3",
            "train.eval_every=0", "train.ckpt_every=10", "train.keep_ckpts=5", "train.samples=",
            "train.weight_decay=0", "train.log_every=1"]


@pytest.fixture(scope="module")
def lora_run(imported, tmp_path_factory):
    """(workdir, config) of a 30-step LoRA SFT of the imported run on questions about items 0-63 (held out:
    64-79)."""
    tmp = tmp_path_factory.mktemp("lora")
    data, heldout = tmp / "chat.jsonl", tmp / "heldout.jsonl"
    write_conversations(conversations(range(64)), data)
    write_conversations(conversations(range(64, 80)), heldout)
    train(lora_config(imported, data, heldout), tmp / "run")
    return tmp / "run", lora_config(imported, data, heldout)


def losses(workdir) -> dict[int, float]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in records if "train_loss" in r}


def heldout_rouge(workdir, **restore) -> float:
    cfg, graphdef, params, tokenizer, _ = restore_model(open_workdir(workdir), **restore)
    pairs = qa_pairs(conversations(range(64, 80)))
    replies = answer(Sampler(cfg.model, graphdef, params, tokenizer), [p for p, _ in pairs], max_new_tokens=16)
    return score(replies, [r for _, r in pairs])["rouge_l"]


def test_lora_sft_improves_heldout_chat_rouge_l(lora_run, imported):
    before, after = heldout_rouge(imported), heldout_rouge(lora_run[0])
    assert after > before + 0.3, (before, after)
    cfg = open_workdir(lora_run[0]).load_config()
    assert (cfg.train.lora.rank, cfg.train.lora.alpha, cfg.init_from) == (8, 16.0, str(imported.absolute()))


def test_checkpoint_holds_only_the_adapters_and_resumes_exactly(lora_run, tmp_path):
    run, cfg = lora_run
    saved = json.loads((run / "checkpoints" / "30" / "params" / "_METADATA").read_text())["tree_metadata"]
    names = {"/".join(ast.literal_eval(key)) for key in saved}  # each leaf's path, as a tuple's repr
    projections = ("query", "key", "value", "out", "gate", "up", "down")
    assert names == {f"blocks/{i}/{part}/{p}/{ab}" for i in range(cfg.model.num_layers) for p in projections
                     for part in ["attn" if p in projections[:4] else "mlp"] for ab in "ab"}
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    for step in ("30", "20"):
        shutil.rmtree(resumed / "checkpoints" / step)
    train(cfg, resumed)
    assert losses(resumed) == losses(run)
    _, _, a, _, _ = restore_model(open_workdir(resumed))
    _, _, b, _, _ = restore_model(open_workdir(run))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_lora_merge_writes_a_plain_run_that_samples_identically(lora_run, imported, tmp_path, capsys):
    run = lora_run[0]
    merged = tmp_path / "merged"
    assert main(["lora", "merge", "--workdir", str(run), "--out", str(merged)]) == 0
    cfg, graphdef, params, _, step = restore_model(open_workdir(merged))
    assert cfg.train.lora.rank == 0 and step == 30
    assert not any(isinstance(x, LoraWeight) for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(
        x, LoraWeight)))
    _, _, unmerged, _, _ = restore_model(open_workdir(run))
    np.testing.assert_allclose(logits(graphdef, params), logits(graphdef, unmerged), atol=1e-4)
    capsys.readouterr()
    prompt = ["--prompt", "<|user|>What is item 70?", "--temperature", "0", "--max-new-tokens", "12"]
    texts = []
    for workdir in (run, merged):
        assert main(["sample", "--workdir", str(workdir), *prompt]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1]
    question = [{"role": "user", "content": "What is item 70?"}]
    replies = [list(ChatEngine.from_workdir(w, None, num_slots=2).stream_reply(question, 0.0, 1.0, 12, 0))[-1]
               for w in (run, merged)]  # the serving engine (chat, demo, serve) runs the LoRA run unmerged
    assert replies[0] == replies[1] and replies[0].startswith("Item")
    compressed = compress_run(run, tmp_path / "int8", Compression(quant="int8"))["out"]  # of the merged weights
    cfg, _, int8, _, _ = restore_model(open_workdir(compressed))
    assert cfg.train.lora.rank == 0
    assert np.abs(logits(graphdef, int8) - logits(graphdef, unmerged)).mean() < 0.05
    assert main(["lora", "merge", "--workdir", str(run), "--out", str(merged)]) == 2  # never over a run
    assert main(["lora", "merge", "--workdir", str(imported), "--out", str(tmp_path / "x")]) == 2
    assert "not a LoRA run" in capsys.readouterr().err


def test_plan_counts_the_frozen_base_and_the_adapters():
    full = plan(tiny_config(), 1)
    lora = plan(tiny_config("train.lora.rank=4"), 1)
    int8 = plan(tiny_config("train.lora.rank=4", "train.lora.base_dtype=int8"), 1)
    assert lora["total_bytes_per_device"] < full["total_bytes_per_device"]
    assert int8["base_bytes_per_device"] < lora["base_bytes_per_device"] == full["param_bytes_per_device"]
    # layers x rank x (K + N) of query, key, value (2 kv heads), out, then gate, up, down (d 64, d_ff 128)
    assert lora["trainable_params"] == 2 * 4 * (128 + 96 + 96 + 128 + 3 * 192)
    moments = 2 * lora["param_bytes_per_device"]  # Adam's two moments of the adapters, and its step counters
    assert moments < lora["opt_bytes_per_device"] <= moments + 16 < full["opt_bytes_per_device"] / 10
    assert lora["activation_bytes_per_device"] == full["activation_bytes_per_device"]
    assert "frozen base (LoRA)" in format_plan(lora) and "rank 4" in format_plan(lora)


def lora_run_by_hand(tmp_path, tokenizer, family: str, *overrides: str):
    """A LoRA run directory (config, tokenizer, one checkpoint of random non-zero adapters) on a random base run."""
    from test_hf_export import random_run

    base = random_run(tmp_path / "base", tokenizer, family, tied=family == "gpt2")
    cfg = apply_overrides(open_workdir(base).load_config(), [f"init_from={base}", "init_from_step=7",
                                                             "train.lora.rank=4", "train.lora.alpha=8", *overrides])
    _, params, _ = abstract_model(cfg.model)
    adapters = init_adapters(params, LoraSpec.from_config(cfg.train.lora), ModelConfig.from_config(cfg.model).mlp,
                             jax.random.PRNGKey(3))
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.PRNGKey(4), len(leaves))
    adapters = jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape)
                                         for x, k in zip(leaves, keys, strict=True)])
    wd = Workdir(tmp_path / "lora")
    wd.path.mkdir()
    wd.save_config(cfg)
    tokenizer.save(wd.tokenizer_dir)
    with Checkpointer(wd.checkpoint_dir) as ckpt:
        ckpt.save_params(5, adapters)
    return wd.path


@pytest.mark.parametrize("family,overrides", [
    ("llama", []),
    ("gpt2", []),
    ("gpt2", ["train.lora.targets=", "train.lora.target_regex=blocks/1/attn/(key|value)|blocks/0/mlp/fc_out"]),
])
def test_peft_loads_an_exported_adapter_with_lmjax_logits(tmp_path, shared_tokenizer, family, overrides):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    import torch

    run = lora_run_by_hand(tmp_path, shared_tokenizer, family, *overrides)
    _, graphdef, params, _, _ = restore_model(open_workdir(run))
    vocab = shared_tokenizer.vocab_size
    ours = logits(graphdef, params, HF_TOKENS)[..., :vocab]
    out = export_hf(run, tmp_path / "hf", lora="adapter")
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8.0)
    base = transformers.AutoModelForCausalLM.from_pretrained(out)
    model = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
    with torch.no_grad():
        theirs = model(torch.from_numpy(HF_TOKENS)).logits.numpy()
    assert np.abs(theirs - ours).max() < 1e-5
    merged = export_hf(run, tmp_path / "merged")  # the default: adapters folded into the weights
    assert not (merged / "adapter").exists()
    with torch.no_grad():
        theirs = transformers.AutoModelForCausalLM.from_pretrained(merged)(torch.from_numpy(HF_TOKENS)).logits.numpy()
    assert np.abs(theirs - ours).max() < 1e-5
    with pytest.raises(ConfigError, match="not a LoRA run"):
        export_hf(tmp_path / "base", tmp_path / "x", lora="adapter")


def test_lora_trains_alike_on_an_fsdp_tensor_data_mesh(lora_run, tmp_path):
    """Four steps on 8 devices (data 2 x fsdp 2 x tensor 2, in a process of its own) give the one-device losses;
    with adapter dropout and the base held in bfloat16."""
    _, cfg = lora_run
    cfg = apply_overrides(cfg, ["train.steps=4", "train.ckpt_every=4", "train.lora.dropout=0.1",
                                "train.lora.base_dtype=bfloat16"])
    train(cfg, tmp_path / "one")
    (tmp_path / "config.json").write_text(apply_overrides(cfg, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
                                          .to_json())
    script = ("import sys; from lmjax.config import config_from_json; from lmjax.train.loop import train; "
              "train(config_from_json(open(sys.argv[1]).read()), sys.argv[2])")
    env = dict(xla_cache_env(), XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "config.json"), str(tmp_path / "eight")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in proc.stdout + proc.stderr
    one, eight = losses(tmp_path / "one"), losses(tmp_path / "eight")
    assert list(eight) == [1, 2, 3, 4] and eight == pytest.approx(one, abs=1e-4)


@pytest.mark.parametrize("override,message", [
    ("train.lora.rank=-1", "train.lora.rank must be >= 0"),
    ("train.lora.alpha=0", "train.lora.alpha must be positive"),
    ("train.lora.dropout=1.0", r"train.lora.dropout must be in \[0, 1\)"),
    ("train.lora.targets=query,qkv", r"train.lora.targets: unknown \['qkv'\]"),
    ("train.lora.base_dtype=int4", "train.lora.base_dtype must be one of"),
    ("train.lora.target_regex=blocks/(", "train.lora.target_regex 'blocks/\\(' is not a regular expression"),
])
def test_bad_lora_knobs_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(apply_overrides(base_config(), ["train.lora.rank=4", override]))


def test_lora_targets_the_model_lacks_are_named(tmp_path):
    _, _, params = tiny_model("llama")
    for spec, message in [(LoraSpec(rank=2, targets=("fc_in",)), "'fc_in', which a model with the swiglu MLP does "
                                                                 "not have"),
                          (LoraSpec(rank=2, targets=(), target_regex="blocks/9/.*"), "matches no parameter"),
                          (LoraSpec(rank=2, target_regex="blocks/0/attn_norm/scale"), "not a block projection"),
                          (LoraSpec(rank=2, targets=()), "selects no weight")]:
        with pytest.raises(ConfigError, match=message):
            target_paths(params, spec, "swiglu")
    with pytest.raises(ConfigError, match="train.lora needs init_from"):
        train(tiny_config("train.lora.rank=4"), tmp_path / "no_base")
    with pytest.raises(ConfigError, match="supports train.objective=lm only"):
        validate(apply_overrides(base_config(), ["train.lora.rank=4", "train.objective=dpo"]))


@pytest.mark.parametrize("family,mlp", [("llama", "relu2"), ("gpt2", "swiglu"), ("llama", "gelu")])
def test_the_mlp_target_follows_the_models_mlp_not_its_family(family, mlp):
    """`model.mlp` picks the MLP whatever the family (the speedrun recipe is llama with relu2): the target
    "mlp" means that MLP's weights."""
    cfg = base_config()
    cfg.model.update(family=family, mlp=mlp, vocab_size=64, num_layers=1, num_heads=2, d_model=16, d_ff=32,
                     seq_len=8)
    _, params, _ = abstract_model(cfg.model)
    paths = target_paths(params, LoraSpec(rank=2, targets=("mlp",)), mlp)
    assert sorted(p[-1] for p in paths) == sorted(MLP_WEIGHTS[mlp])

"""Quantization and pruning: error bounds, exact sparsity and patterns, Wanda against magnitude, and a
compressed run loading and serving like any other."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmjax.cli import main
from lmjax.compress.prune import input_norms, prune_mask, prune_params, sparsity_of
from lmjax.compress.run import Compression, compress_run
from lmjax.config import ConfigError
from lmjax.eval.lm import eval_step, lm_metrics
from lmjax.input.packing import eval_batches
from lmjax.input.specs import open_chunks
from lmjax.model.quantized import QArray, dequantize, for_matmul, qeinsum, quantize, quantize_params, take_rows
from lmjax.run.restore import restore_model
from lmjax.run.workdir import open_workdir


@pytest.mark.parametrize("bits,group_size", [("int8", 0), ("int4", 0), ("int4", 16)])
def test_round_trip_error_is_at_most_half_a_step_per_group(bits, group_size):
    w = np.random.default_rng(0).standard_normal((64, 4, 8)).astype(np.float32)
    w[:, 0, 0] *= 50  # one output column with a far larger range than the rest
    qa = quantize(w, 1, bits, group_size)
    levels = {"int8": 127, "int4": 7}[bits]
    assert qa.scale.shape == (64 // (group_size or 64), 32)
    assert (qa.q.dtype, qa.q.shape) == ((jnp.int8, (64, 32)) if bits == "int8" else (jnp.uint8, (32, 32)))
    assert qa.values.shape == (64, 32) and int(jnp.abs(qa.values).max()) == levels
    error = np.abs(np.asarray(dequantize(qa)) - w).reshape(64, 32)
    step = np.repeat(np.asarray(qa.scale), 64 // qa.scale.shape[0], axis=0)  # each weight's own scale
    assert np.all(error <= step / 2 + 1e-6)
    assert np.asarray(qa.scale)[:, 0].min() > 10 * np.asarray(qa.scale)[:, 1:].max()  # the big column has its own


@pytest.mark.parametrize("rows", [(2, 3), (1, 1)])  # one row takes the int8 matmul's two-row path
@pytest.mark.parametrize("matmul,tolerance", [("dequant", 1e-5), ("int8", 0.02)])
def test_qeinsum_matches_the_dequantized_weight(matmul, tolerance, rows):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((*rows, 4, 16)), jnp.float32)  # [b, t, heads, head_dim]
    w = rng.standard_normal((4, 16, 32)).astype(np.float32)  # the attention output's [heads, head_dim, d]
    qa = for_matmul({"w": quantize(w, 2, "int4", 32)}, matmul)["w"]
    got = qeinsum("bthk,hkd->btd", x, qa, jnp.float32)
    want = jnp.einsum("bthk,hkd->btd", x, dequantize(qa))  # (for int8: of the requantized weight)
    assert got.shape == (*rows, 32)
    assert float(jnp.abs(got - want).max()) <= tolerance * float(jnp.abs(want).max())


def test_quantized_embedding_rows_and_head():
    table = np.random.default_rng(2).standard_normal((40, 16)).astype(np.float32)  # [vocab, d]
    qa = quantize(table, 1, "int8", transposed=True)
    ids = jnp.asarray([[3, 0, 39]])
    np.testing.assert_allclose(take_rows(qa, ids, jnp.float32), np.asarray(dequantize(qa))[np.asarray(ids)],
                               rtol=1e-6)
    x = jnp.ones((1, 1, 16))
    np.testing.assert_allclose(qeinsum("btd,vd->btv", x, qa, jnp.float32),
                               jnp.einsum("btd,vd->btv", x, dequantize(qa)), rtol=1e-5, atol=1e-5)


def test_prune_masks_have_the_exact_sparsity_and_pattern():
    score = np.random.default_rng(3).random((16, 6))
    per_output = prune_mask(score, 0.5, "", per_output=True)
    assert np.all(per_output.sum(axis=0) == 8)
    assert np.all(score[~per_output].max() <= score[per_output].max())
    layer = prune_mask(score, 0.25, "", per_output=False)
    assert layer.sum() == 16 * 6 - 24 and score[~layer].max() < score[layer].min()
    two_four = prune_mask(score, 0.0, "2:4", per_output=False)
    assert np.all(two_four.reshape(4, 4, 6).sum(axis=1) == 2)
    with pytest.raises(ValueError, match="N:M"):
        prune_mask(score, 0.0, "2-4", per_output=False)
    with pytest.raises(ValueError, match="multiple of 32"):
        prune_mask(score, 0.0, "2:32", per_output=False)


@pytest.fixture(scope="module")
def run(trained_run):
    """(cfg, graphdef, float params, tokenizer, validation batches) of the session's trained run."""
    cfg, graphdef, params, tokenizer, _ = restore_model(open_workdir(trained_run[0]))
    chunks = open_chunks(cfg.data.val, tokenizer, cfg.model.seq_len)
    return cfg, graphdef, params, tokenizer, eval_batches(chunks, cfg.model.seq_len, 8, 4)


def bpb(run, params) -> float:
    cfg, graphdef, _, tokenizer, batches = run
    step = jax.jit(lambda p, b, t: eval_step(p, b, t, graphdef=graphdef))
    return lm_metrics(step, params, batches, jnp.asarray(tokenizer.token_bytes()))["val_bpb"]


def test_quantized_logits_stay_close_to_float(run):
    """Mean |logit error| relative to the logits' standard deviation: under 0.5% with int8 weights (either
    matmul), under 3% with int4 in groups of 32; int8 costs under 1% of held-out bits per byte."""
    cfg, graphdef, params, _, batches = run
    batch = batches[0]
    forward = jax.jit(lambda p: nnx.merge(graphdef, p)(batch["inputs"], batch["positions"], batch["segment_ids"])[0])
    vocab = cfg.model.vocab_size
    reference = forward(params)[..., :vocab]
    for bits, group_size, matmul, tolerance in [("int8", 0, "dequant", 0.005), ("int8", 0, "int8", 0.005),
                                                ("int4", 32, "int8", 0.03)]:
        quantized = for_matmul(quantize_params(params, bits, group_size), matmul)
        error = float(jnp.abs(forward(quantized)[..., :vocab] - reference).mean() / reference.std())
        assert error < tolerance, (bits, group_size, matmul, error)
    assert bpb(run, for_matmul(quantize_params(params, "int8"), "int8")) < bpb(run, params) * 1.01


def test_wanda_keeps_what_large_inputs_read():
    """With input features of very different scales (as after trained norms), Wanda's |W| x ||X|| keeps the
    weights that matter for the output: at 50% (and 2:4) its output error is well below magnitude pruning's."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((512, 64)) * np.exp(1.5 * rng.standard_normal(64))  # [tokens, features]
    w = rng.standard_normal((64, 32)).astype(np.float32)
    params = {"blocks": {0: {"mlp": {"down": jnp.asarray(w)}}}}
    norms = {"blocks/0/mlp/down": np.linalg.norm(x, axis=0)}
    error = {}
    for method, sparsity, pattern in [("wanda", 0.5, ""), ("magnitude", 0.5, ""), ("wanda", 0.0, "2:4"),
                                      ("magnitude", 0.0, "2:4")]:
        pruned = np.asarray(prune_params(params, method, sparsity, pattern, norms)["blocks"][0]["mlp"]["down"])
        assert (pruned == 0).mean() == 0.5
        error[method, pattern] = np.linalg.norm(x @ (pruned - w)) / np.linalg.norm(x @ w)
    assert error["wanda", ""] < 0.5 * error["magnitude", ""]
    assert error["wanda", "2:4"] < 0.7 * error["magnitude", "2:4"]


def test_wanda_on_the_trained_model(run):
    """Wanda's calibration reads every block projection; at 50% both methods cost little on this tiny model
    (the bench compares them on the quickstart model, docs/benchmarks.md)."""
    cfg, _, params, _, batches = run
    norms = input_norms(cfg.model, params, batches)
    assert {n.split("/", 2)[2] for n in norms} == {"attn/query", "attn/key", "attn/value", "attn/out", "mlp/gate",
                                                   "mlp/up", "mlp/down"}
    assert norms["blocks/0/attn/out"].shape == (cfg.model.d_model,) and np.all(norms["blocks/1/mlp/down"] > 0)
    dense = bpb(run, params)
    wanda = prune_params(params, "wanda", 0.5, norms=norms)
    assert sparsity_of(wanda) == 0.5 and abs(bpb(run, wanda) - dense) < 0.1 * dense


def test_compress_cli_writes_a_run_every_command_loads(trained_run, tmp_path, capsys):
    out = tmp_path / "tiny-w8"
    assert main(["compress", "--workdir", str(trained_run[0]), "--out", str(out), "--quant", "int8",
                 "--prune", "wanda", "--pattern", "2:4", "--calibration-batches", "2"]) == 0
    assert "50.0% zero" in capsys.readouterr().out
    saved = json.loads((out / "config.json").read_text())["compress"]
    assert saved["quant"] == "int8" and saved["prune"] == "wanda" and saved["pattern"] == "2:4"
    cfg, graphdef, params, _, step = restore_model(open_workdir(out))
    assert isinstance(params["blocks"][0]["mlp"]["down"], QArray) and sparsity_of(params) == 0.5
    down = params["blocks"][0]["mlp"]["down"]
    q = np.asarray(down.values).reshape(-1, 4, down.values.shape[1])
    assert np.all((q != 0).sum(axis=1) <= 2)  # 2:4 survives quantization

    assert main(["sample", "--workdir", str(out), "--prompt", "def", "--max-new-tokens", "5", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("def")

    from lmjax.serve.api import Api, ServeSettings
    from lmjax.serve.engine import ChatEngine

    engine = ChatEngine.from_workdir(out, num_slots=2)
    assert engine.model_card()["compression"]["quant"] == "int8"
    assert sparsity_of(engine.engine.params) == 0.5  # still pruned where the server reads them
    assert engine.generate([engine.prompt_ids([{"role": "user", "content": "hi"}], 4)], 4)
    api = Api(engine, ServeSettings(model_name="tiny-w8"), warmup=False)
    import asyncio

    import httpx

    async def models() -> dict:
        api.ready.set()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api.app), base_url="http://t") as http:
            return (await http.get("/v1/models")).json()

    assert asyncio.run(models())["data"][0]["compression"]["prune"] == "wanda"
    from lmjax.serve.demo import build_demo
    from lmjax.serve.feedback import FeedbackStore
    from lmjax.serve.safety import ContentFilter
    from lmjax.text.blocklist import Blocklist

    feedback = FeedbackStore.for_workdir(out)
    assert build_demo(engine, feedback, ContentFilter(Blocklist.default(), feedback)) is not None
    engine.close()


def test_sample_on_a_compressed_run_compiles_once(trained_run, tmp_path):
    from lmjax.infer.sampler import Sampler

    out = tmp_path / "tiny-int4"
    compress_run(trained_run[0], out, Compression(quant="int4", group_size=32))
    cfg, graphdef, params, tokenizer, _ = restore_model(open_workdir(out))
    sampler = Sampler(cfg.model, graphdef, for_matmul(params, "int8"), tokenizer)
    for prompt, seed in (("def", 0), ("class Foo", 1)):
        sampler.generate([prompt], 6, seed=seed)
        assert sampler._decode._cache_size() == 1 and sampler._prefill._cache_size() == 1


def test_bad_compress_requests_are_refused_and_nothing_is_overwritten(trained_run, tmp_path):
    with pytest.raises(ConfigError, match="nothing to do"):
        compress_run(trained_run[0], tmp_path / "a", Compression())
    with pytest.raises(ConfigError, match="--sparsity"):
        compress_run(trained_run[0], tmp_path / "a", Compression(prune="magnitude"))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        compress_run(trained_run[0], taken, Compression(quant="int8"))
    assert (taken / "notes.txt").read_text() == "mine"
    compressed = tmp_path / "c"
    compress_run(trained_run[0], compressed, Compression(quant="int8"))
    with pytest.raises(ConfigError, match="itself compressed"):
        compress_run(compressed, tmp_path / "cc", Compression(quant="int4"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "taken"]  # no staging directory left behind


@pytest.mark.parametrize("cache_dtype,tolerance", [("bfloat16", 0.02), ("int8", 0.02)])
def test_kv_cache_dtype_keeps_the_logits(run, cache_dtype, tolerance):
    """Prefill through a bfloat16 or int8 KV cache then one decode step gives the logits of the float32 cache
    within `tolerance` of their standard deviation (mean |difference|)."""
    from lmjax.infer.sampler import prefill_logits
    from lmjax.model.transformer import init_cache

    cfg, graphdef, params, _, batches = run
    tokens = jnp.asarray(batches[0]["inputs"][:2, :16])
    lengths = jnp.asarray([16, 11])
    outputs = []
    for dtype in ("float32", cache_dtype):
        model_cfg = cfg.model.copy_and_resolve_references()
        model_cfg.cache_dtype = dtype
        cache = init_cache(model_cfg, 2, 32)
        if dtype == "int8":
            assert cache["layers"][0]["k"].dtype == jnp.int8 and cache["layers"][0]["k_scale"].shape == (2, 32, 2)
        _, cache = prefill_logits(params, tokens, lengths, cache, graphdef=graphdef)
        logits, _ = nnx.merge(graphdef, params)(tokens[:, :1], cache["index"][:, None], jnp.ones((2, 1), jnp.int32),
                                                cache=cache)
        outputs.append(logits[..., :cfg.model.vocab_size])
    reference, got = outputs
    assert float(jnp.abs(got - reference).mean() / reference.std()) < tolerance


def test_compress_can_set_the_kv_cache_dtype(trained_run, tmp_path):
    compress_run(trained_run[0], tmp_path / "kv8", Compression(cache_dtype="int8"))
    cfg = open_workdir(tmp_path / "kv8").load_config()
    assert cfg.model.cache_dtype == "int8" and cfg.compress.quant == "" and cfg.compress.source
    from lmjax.serve.engine import ChatEngine

    engine = ChatEngine.from_workdir(tmp_path / "kv8", num_slots=2)
    assert engine.engine._cache["layers"][0]["k"].dtype == jnp.int8
    assert engine.generate([engine.prompt_ids([{"role": "user", "content": "hi"}], 4)], 4, temperature=0)

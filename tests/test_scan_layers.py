"""`model.scan_layers`: scanned blocks compute what the unrolled ones do from the same weights (forward, loss,
gradients under each remat policy, dropout, decoding), and parameters convert between the two layouts wherever
a run is loaded (init_from, restore_model, compress)."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import shared_tokenizer_dir, tiny_config
from flax import nnx

from lmjax.compress.run import Compression, compress_run
from lmjax.config import REMAT_POLICIES, ConfigError, base_config, validate
from lmjax.infer.sampler import Sampler
from lmjax.model.config import ModelConfig
from lmjax.model.loss import token_losses
from lmjax.model.params import abstract_model, init_params, stack_layers, unstack_layers
from lmjax.model.transformer import init_cache
from lmjax.run.checkpoint import Checkpointer
from lmjax.run.restore import init_params_from, restore_model
from lmjax.run.workdir import Workdir
from lmjax.text.tokenizer import load_tokenizer
from lmjax.train.loop import resume_config
from lmjax.train.optim import make_optimizer
from lmjax.train.plan import plan

TOL = dict(rtol=1e-5, atol=1e-5)


def model_cfg(family: str = "llama", scan: bool = False, **knobs) -> ModelConfig:
    m = base_config().model
    m.update(family=family, vocab_size=97, num_layers=2, num_heads=4, num_kv_heads=2 if family == "llama" else 0,
             d_model=32, d_ff=64, seq_len=16, dtype="float32", scan_layers=scan, **knobs)
    return ModelConfig.from_config(m)


def random_batch(seed: int = 0, batch: int = 2, length: int = 16, vocab: int = 97) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, length + 1), dtype=np.int32)
    segments = np.ones((batch, length), np.int32)
    segments[1, length // 2:] = 2  # two packed documents in the second row
    positions = np.where(segments == 2, np.arange(length) - length // 2, np.arange(length)).astype(np.int32)
    return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
            "segment_ids": jnp.asarray(segments), "positions": jnp.asarray(positions)}


def assert_trees_close(a, b, **tol) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **(tol or TOL)), a, b)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_scanned_init_is_the_unrolled_init_stacked_with_a_layers_axis(family):
    unrolled, scanned = model_cfg(family), model_cfg(family, scan=True)
    params = init_params(unrolled, jax.random.PRNGKey(0))
    stacked = init_params(scanned, jax.random.PRNGKey(0))
    assert_trees_close(stack_layers(params), stacked, rtol=0, atol=0)
    assert_trees_close(unstack_layers(stacked), params, rtol=0, atol=0)
    _, shapes, axes = abstract_model(scanned)
    assert axes["blocks"]["attn"]["query"] == ("layers", "embed", "heads", "head_dim")
    flat_axes = dict(jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, tuple))[0])
    for path, shape in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        assert len(flat_axes[path]) == len(shape.shape), path
        assert (flat_axes[path][0] == "layers") == (path[0].key == "blocks"), path


def loss_and_grads(cfg: ModelConfig, batch: dict[str, jax.Array]):
    """The jitted (params, dropout key) -> (mean loss, gradients) of `cfg`'s model on `batch`."""
    graphdef = abstract_model(cfg)[0]
    return jax.jit(jax.value_and_grad(lambda p, rng: token_losses(p, graphdef, batch, dropout_rng=rng).mean()))


@pytest.fixture(scope="module")
def unrolled_reference():
    """(params, batch, loss, gradients) of the unrolled model with dropout, without remat (which never changes
    values: the reference for every policy)."""
    cfg, batch = model_cfg(dropout=0.1), random_batch()
    params = init_params(cfg, jax.random.PRNGKey(0))
    return params, batch, *loss_and_grads(cfg, batch)(params, jax.random.PRNGKey(3))


@pytest.mark.parametrize("remat", REMAT_POLICIES)
def test_loss_and_gradients_with_dropout_equal_the_unrolled_model(unrolled_reference, remat):
    params, batch, loss, grads = unrolled_reference
    scanned_step = loss_and_grads(model_cfg(scan=True, remat=remat, dropout=0.1), batch)
    scanned_loss, scanned_grads = scanned_step(stack_layers(params), jax.random.PRNGKey(3))
    np.testing.assert_allclose(scanned_loss, loss, **TOL)
    assert_trees_close(unstack_layers(scanned_grads), grads)
    # dropout is on (another key drops other units) and the same in both layouts
    other_loss, _ = scanned_step(stack_layers(params), jax.random.PRNGKey(4))
    assert abs(float(other_loss) - float(loss)) > 1e-4


def test_gpt2_logits_equal_the_unrolled_model():
    unrolled, scanned = model_cfg("gpt2"), model_cfg("gpt2", scan=True)
    params = init_params(unrolled, jax.random.PRNGKey(1))
    batch = random_batch(1)
    logits = lambda cfg, p: jax.jit(lambda p: nnx.merge(abstract_model(cfg)[0], p)(
        batch["inputs"], batch["positions"], batch["segment_ids"])[0])(p)
    np.testing.assert_allclose(logits(scanned, stack_layers(params)), logits(unrolled, params), **TOL)


def test_decoding_with_a_cache_equals_the_unrolled_model():
    unrolled, scanned = model_cfg(), model_cfg(scan=True)
    params = init_params(unrolled, jax.random.PRNGKey(2))
    batch = random_batch(2, length=8)

    def prefill_then_step(cfg, params):
        model = nnx.merge(abstract_model(cfg)[0], params)
        cache = init_cache(cfg, 2, 16)
        first, cache = model(batch["inputs"], batch["positions"], jnp.ones_like(batch["inputs"]), cache=cache)
        token = jnp.argmax(first[:, -1:], -1)
        second, cache = model(token, cache["index"][:, None], jnp.ones_like(token), cache=cache)
        return first, second, cache

    assert_trees_close(jax.jit(prefill_then_step, static_argnums=0)(scanned, stack_layers(params)),
                       jax.jit(prefill_then_step, static_argnums=0)(unrolled, params))


def test_muon_orthogonalises_each_layer_of_the_stack_as_the_unrolled_matrices():
    params = init_params(model_cfg(), jax.random.PRNGKey(0))
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(1), x.shape), params)
    tx = make_optimizer(tiny_config("train.optimizer=muon", "train.warmup_steps=0").train)
    update = jax.jit(lambda g, p: tx.update(g, tx.init(p), p)[0])
    assert_trees_close(update(stack_layers(grads), stack_layers(params)), stack_layers(update(grads, params)),
                       rtol=1e-4, atol=1e-6)


def save_run(path, scan: bool, params=None, step: int = 5):
    """A run directory (config, tokenizer, one checkpoint of `params`, random if None) of the tiny model in the
    unrolled or scanned layout; returns (workdir, its params)."""
    cfg = tiny_config(f"model.scan_layers={scan}")
    cfg.model.vocab_size = load_tokenizer(shared_tokenizer_dir()).vocab_size
    if params is None:
        params = init_params(cfg.model, jax.random.PRNGKey(7))
    wd = Workdir(path)
    wd.path.mkdir(parents=True)
    wd.save_config(cfg)
    shutil.copytree(shared_tokenizer_dir(), wd.tokenizer_dir)
    with Checkpointer(wd.checkpoint_dir) as ckpt:
        ckpt.save_params(step, params)
    return wd, params


def test_restore_model_of_a_scanned_run_unrolls_it_and_samples_as_the_scanned_model(tmp_path):
    wd, stacked = save_run(tmp_path / "scanned", scan=True)
    cfg, graphdef, params, tokenizer, step = restore_model(wd)
    assert step == 5 and not cfg.model.scan_layers
    assert_trees_close(params, unstack_layers(stacked), rtol=0, atol=0)
    scanned_cfg = wd.load_config().model
    scanned_graphdef = abstract_model(scanned_cfg)[0]
    sample = lambda m, g, p: Sampler(m, g, p, tokenizer, max_len=32).generate(["Return the"], 8, temperature=0)
    assert sample(scanned_cfg, scanned_graphdef, stacked) == sample(cfg.model, graphdef, params)


def test_compressing_a_scanned_run_writes_an_unrolled_run(tmp_path):
    wd, stacked = save_run(tmp_path / "scanned", scan=True)
    compress_run(wd.path, tmp_path / "int8", Compression(quant="int8"))
    cfg, _, params, _, _ = restore_model(Workdir(tmp_path / "int8"))
    assert not cfg.model.scan_layers and cfg.compress.quant == "int8"
    assert set(params["blocks"]) == set(range(cfg.model.num_layers))


@pytest.mark.parametrize("saved_scan", [False, True])
def test_init_from_converts_a_run_of_the_other_layout(tmp_path, saved_scan):
    source, saved = save_run(tmp_path / "source", scan=saved_scan)
    cfg = tiny_config(f"model.scan_layers={not saved_scan}", f"init_from={source.path}", "init_from_step=5")
    cfg.model.vocab_size = source.load_config().model.vocab_size
    _, abstract, _ = abstract_model(cfg.model)
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), abstract)
    params = init_params_from(cfg, abstract)
    expected = unstack_layers(saved) if saved_scan else stack_layers(saved)
    assert_trees_close(params, expected, rtol=0, atol=0)
    assert all(p.sharding == sharding for p in jax.tree.leaves(params))


def test_resume_with_another_layout_is_refused_and_lora_needs_unrolled_layers(tmp_path):
    wd, _ = save_run(tmp_path / "run", scan=False)
    cfg = wd.load_config()
    cfg.model.scan_layers = True
    with pytest.raises(ConfigError, match="model.scan_layers False -> True.*init_from"):
        resume_config(cfg, wd)
    with pytest.raises(ConfigError, match="train.lora needs model.scan_layers=False"):
        validate(tiny_config("model.scan_layers=True", "train.lora.rank=4", "init_from=x"))


def test_plan_is_the_same_for_both_layouts():
    unrolled = plan(tiny_config("model.remat=full"), num_devices=1)
    scanned = plan(tiny_config("model.remat=full", "model.scan_layers=True"), num_devices=1)
    assert scanned == unrolled


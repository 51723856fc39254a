"""Logical-axis rules, and end to end: every mesh strategy (and mixed precision, adversarial training, the
speedrun recipe and scanned layers on a mixed mesh) trains like one device, and a checkpoint moves between
meshes."""

import json
import os
import subprocess
import sys

import jax
import pytest
from jax.sharding import PartitionSpec as P

from lmjax.config import ConfigError, base_config
from lmjax.model.params import abstract_model
from lmjax.parallel.mesh import check_model_fits_mesh, mesh_shape
from lmjax.parallel.rules import DroppedAxis, logical_to_spec, path_names, resolve_spec, tree_specs
from lmjax.train.optim import make_optimizer

RULES = dict(base_config().mesh.rules)


def test_logical_axes_map_to_mesh_axes():
    sizes = {"data": 2, "fsdp": 2, "tensor": 2}
    assert logical_to_spec(("embed", "mlp"), RULES, sizes) == P("fsdp", "tensor")
    assert logical_to_spec(("batch", "length", "embed"), RULES, sizes) == P(("data", "fsdp"), None, None)
    assert logical_to_spec(("embed", "mlp"), RULES, {"data": 8, "fsdp": 1, "tensor": 1}) == P(None, None)
    assert logical_to_spec(("vocab", "embed"), RULES, sizes, shape=(97, 64)) == P(None, "fsdp")


def test_resolve_spec_reports_every_mesh_axis_it_drops():
    sizes = {"data": 2, "fsdp": 4, "tensor": 3}
    assert resolve_spec(("vocab", "embed"), RULES, sizes, shape=(97, 64)) == (P(None, "fsdp"),
                                                                               [DroppedAxis(0, "vocab", "tensor", 3)])
    # batch = data,fsdp: data divides 6 but data x fsdp does not; size-1 axes are never reported.
    spec, dropped = resolve_spec(("batch", "mlp"), RULES, {"data": 2, "fsdp": 4, "tensor": 1}, shape=(6, 5))
    assert spec == P("data", None) and dropped == [DroppedAxis(0, "batch", "fsdp", 8)]
    spec, dropped = resolve_spec(("embed", "mlp"), {**RULES, "mlp": "fsdp,tensor"}, sizes, shape=(8, 6))
    assert spec == P("fsdp", "tensor") and dropped == [DroppedAxis(1, "mlp", "fsdp", 0)]
    assert not dropped[0].indivisible


def _toy_model():
    """A tiny parameter tree with logical axes, in the shape `abstract_model` returns them."""
    s = lambda *shape: jax.ShapeDtypeStruct(shape, "float32")
    shapes = {"embed": s(100, 6), "blocks": {i: {"up": s(6, 10), "scale": s(6)} for i in range(3)}}
    axes = {"embed": ("vocab", "embed"), "blocks": {i: {"up": ("embed", "mlp"), "scale": ("embed",)} for i in range(3)}}
    return shapes, axes


def test_model_check_logs_dropped_shardings_and_rejects_undivided_required_axes():
    shapes, axes = _toy_model()
    required = {"mlp": "model.d_ff"}
    assert check_model_fits_mesh(shapes, axes, RULES, {"data": 1, "fsdp": 2, "tensor": 2}, required) == []
    lines = check_model_fits_mesh(shapes, axes, RULES, {"data": 1, "fsdp": 4, "tensor": 5}, required)
    assert lines == ["sharding dropped: the fsdp mesh axis (4 devices) does not divide logical axis 'embed' of size 6; "
                     "replicated along it: blocks.*.scale dim 0 (x3), blocks.*.up dim 0 (x3), embed dim 1"]
    with pytest.raises(ConfigError, match=r"the tensor mesh axis \(3 devices\) does not divide model.d_ff = 10 "
                                          r"\(dimension 1 of blocks.0.up, logical axis 'mlp'\); pick a mesh.tensor"):
        check_model_fits_mesh(shapes, axes, RULES, {"data": 1, "fsdp": 1, "tensor": 3}, required)
    # Not required: the same drop is only reported, like the vocabulary's.
    assert check_model_fits_mesh(shapes, axes, RULES, {"data": 1, "fsdp": 1, "tensor": 3}, {}) == [
        "sharding dropped: the tensor mesh axis (3 devices) does not divide logical axis 'mlp' of size 10; "
        "replicated along it: blocks.*.up dim 1 (x3)",
        "sharding dropped: the tensor mesh axis (3 devices) does not divide logical axis 'vocab' of size 100; "
        "replicated along it: embed dim 0"]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_optimizer_moments_follow_their_parameter(optimizer):
    """The optimizer state as optax builds it (clipping, AdamW or Muon with its AdamW side, the schedule's
    counters): every moment is laid out like its parameter, everything else is replicated."""
    cfg = base_config()
    cfg.model.update(vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2, d_model=32, d_ff=64, seq_len=16)
    cfg.train.optimizer = optimizer
    _, params, axes = abstract_model(cfg.model)
    state = {"params": params, "opt_state": jax.eval_shape(make_optimizer(cfg.train).init, params)}
    sizes = {"data": 1, "fsdp": 2, "tensor": 2}
    specs = tree_specs(sizes, RULES, state, axes)
    param_specs = tree_specs(sizes, RULES, params, axes)
    by_param = {path_names(p): spec for p, spec in jax.tree_util.tree_flatten_with_path(
        param_specs, is_leaf=lambda x: isinstance(x, P))[0]}
    moments = 0
    for path, spec in jax.tree_util.tree_flatten_with_path(specs["opt_state"], is_leaf=lambda x: isinstance(x, P))[0]:
        names = path_names(path)
        if {"mu", "nu"} & set(names):
            moments += 1
            param = max((p for p in by_param if names[-len(p):] == p), key=len)
            assert spec == by_param[param], (names, spec)
        else:
            assert spec == P(), (names, spec)
    assert moments >= len(by_param) and any(s != P() for s in by_param.values())


def test_mesh_shape_resolves_and_rejects():
    cfg = base_config().mesh
    cfg.update(data=-1, fsdp=2, tensor=2)
    assert mesh_shape(cfg, 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ConfigError, match="does not fit 6 devices"):
        mesh_shape(cfg, 6)


# Every strategy, on 8 forced CPU devices; one process runs them all (see mesh_runs.py).
STRATEGIES = {
    "dp8": ["mesh.data=8"],
    "fsdp8": ["mesh.data=1", "mesh.fsdp=8"],
    "tp2dp4": ["mesh.data=4", "mesh.tensor=2"],
    "dp2fsdp2tp2": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
}
STEPS, SAVED = 10, 5
MIXED = ["model.dtype=bfloat16", "train.grad_accum=2"]  # mixed precision with gradient accumulation
# adversarial training (FreeLB from random starts: ascent loop, RNG and accumulation inside the sharded step)
ADVERSARIAL = ["train.adversarial.method=freelb", "train.adversarial.steps=2", "train.adversarial.init=random",
               "train.grad_accum=2"]
# the speedrun recipe: Muon (Newton-Schulz on sharded matrices) with WSD, QK-norm, ReLU², zero-init, soft-capping
SPEEDRUN = ["train.optimizer=muon", "train.decay=wsd", "train.warmup_steps=2", "model.qk_norm=True",
            "model.mlp=relu2", "model.zero_init_out=True", "model.logit_softcap=15.0"]
# scanned layers (stacked params, remat inside the scan): they start from the unrolled model's weights, stacked,
# so they train like the unrolled single-device run
SCANNED = ["model.scan_layers=True", "model.remat=full"]
# float32: sharded runs differ from one device only in the order of cross-device sums (gradient
# all-reduces, sharded matmul contractions), ~1e-7 relative per op; over 10 Adam steps the losses differ
# by <= 2e-6 (measured), while one wrongly sharded or double-counted op moves them by > 1e-2.
LOSS_TOL = 5e-5
# bfloat16 activations: a different summation order can round an activation to the neighbouring bf16
# value (2^-8 relative), so losses may differ by ~1e-3; still far below what a sharding bug causes.
MIXED_TOL = 5e-3


def _run(out, devices: int, jobs: list[dict]) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    proc = subprocess.run([sys.executable, "tests/mesh_runs.py", str(out), json.dumps(jobs)], capture_output=True,
                          text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


@pytest.fixture(scope="module")
def mesh_runs(tmp_path_factory) -> dict:
    """Losses (and shard sizes) of every strategy, of one device, and of the FSDP=8 run resumed from
    its step-5 checkpoint under TP=2 x DP=4 and on one device."""
    out = tmp_path_factory.mktemp("meshes")
    # Qwen2's query/key/value biases (model.qkv_bias) ride along: imported models train under every strategy.
    common = [f"train.steps={STEPS}", f"train.ckpt_every={SAVED}", "model.qkv_bias=True"]
    moved = {"resume_from": "fsdp8", "resume_step": SAVED}
    eight = _run(out, 8, [{"name": n, "overrides": common + o} for n, o in STRATEGIES.items()]
                 + [{"name": "fsdp8_to_tp2dp4", "overrides": common + STRATEGIES["tp2dp4"], **moved},
                    {"name": "mixed_dp2fsdp2tp2", "overrides": common + MIXED + STRATEGIES["dp2fsdp2tp2"]},
                    {"name": "freelb_dp2fsdp2tp2", "overrides": common + ADVERSARIAL + STRATEGIES["dp2fsdp2tp2"]},
                    {"name": "speedrun_dp2fsdp2tp2", "overrides": common + SPEEDRUN + STRATEGIES["dp2fsdp2tp2"]},
                    {"name": "scanned_dp2fsdp2tp2", "overrides": common + SCANNED + STRATEGIES["dp2fsdp2tp2"]}])
    tokenizer = f"tokenizer.path={out / 'dp8' / 'tokenizer'}"
    one = _run(out, 1, [{"name": "single", "overrides": [*common, tokenizer, "mesh.data=1"]},
                        {"name": "fsdp8_to_single", "overrides": [*common, "mesh.data=1"], **moved},
                        {"name": "mixed_single", "overrides": [*common, *MIXED, tokenizer, "mesh.data=1"]},
                        {"name": "freelb_single", "overrides": [*common, *ADVERSARIAL, tokenizer, "mesh.data=1"]},
                        {"name": "speedrun_single", "overrides": [*common, *SPEEDRUN, tokenizer, "mesh.data=1"]}])
    return {**eight, **one}


def _losses(run: dict) -> list[float]:
    return [run["losses"][str(s)] for s in range(1, STEPS + 1)]


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_strategy_trains_like_one_device(mesh_runs, strategy):
    assert _losses(mesh_runs[strategy]) == pytest.approx(_losses(mesh_runs["single"]), abs=LOSS_TOL)


def test_mixed_precision_and_accumulation_under_sharding(mesh_runs):
    assert _losses(mesh_runs["mixed_dp2fsdp2tp2"]) == pytest.approx(_losses(mesh_runs["mixed_single"]),
                                                                    abs=MIXED_TOL)


def test_fsdp_and_tensor_parallel_really_shard_the_state(mesh_runs):
    fsdp = mesh_runs["fsdp8"]["bytes"]
    per_device = fsdp["param_bytes"] + fsdp["opt_bytes"]
    assert per_device <= (fsdp["total_param_bytes"] + fsdp["total_opt_bytes"]) / 7
    # Every weight is split over fsdp; per-head biases have no axis it maps to and stay replicated.
    assert all("fsdp" in spec for name, spec in fsdp["param_specs"].items() if not name.endswith("_bias")), \
        fsdp["param_specs"]
    tp = mesh_runs["tp2dp4"]["bytes"]
    assert "tensor" in tp["param_specs"]["blocks/0/mlp/up"] and "tensor" in tp["param_specs"]["blocks/0/attn/query"]
    assert tp["param_bytes"] < tp["total_param_bytes"]
    dp = mesh_runs["dp8"]["bytes"]
    assert dp["param_bytes"] == dp["total_param_bytes"]  # data parallelism replicates the state
    for name in STRATEGIES:  # the plan's arithmetic equals what the devices really hold
        b = mesh_runs[name]["bytes"]
        assert (b["param_bytes"], b["opt_bytes"]) == (b["plan_param_bytes"], b["plan_opt_bytes"]), name


def test_adversarial_training_under_sharding(mesh_runs):
    assert _losses(mesh_runs["freelb_dp2fsdp2tp2"]) == pytest.approx(_losses(mesh_runs["freelb_single"]),
                                                                     abs=LOSS_TOL)
    assert _losses(mesh_runs["freelb_single"]) != _losses(mesh_runs["single"])


def test_muon_and_the_speedrun_architecture_under_sharding(mesh_runs):
    assert _losses(mesh_runs["speedrun_dp2fsdp2tp2"]) == pytest.approx(_losses(mesh_runs["speedrun_single"]),
                                                                       abs=LOSS_TOL)
    assert _losses(mesh_runs["speedrun_single"]) != _losses(mesh_runs["single"])


def test_scanned_layers_under_sharding_train_like_unrolled_layers_on_one_device(mesh_runs):
    run = mesh_runs["scanned_dp2fsdp2tp2"]
    assert _losses(run) == pytest.approx(_losses(mesh_runs["single"]), abs=LOSS_TOL)
    specs = run["bytes"]["param_specs"]
    assert specs["blocks/mlp/up"] == str(P(None, "fsdp", "tensor")), specs
    assert (run["bytes"]["param_bytes"], run["bytes"]["opt_bytes"]) == (run["bytes"]["plan_param_bytes"],
                                                                        run["bytes"]["plan_opt_bytes"])


@pytest.mark.parametrize("target", ["fsdp8_to_tp2dp4", "fsdp8_to_single"])
def test_checkpoint_resumes_on_a_different_mesh(mesh_runs, target):
    resumed, original = _losses(mesh_runs[target]), _losses(mesh_runs["fsdp8"])
    assert resumed[:SAVED] == original[:SAVED]  # metrics up to the checkpoint are kept
    assert resumed[SAVED:] == pytest.approx(original[SAVED:], abs=LOSS_TOL)

"""Logical-axis rules, and one end-to-end check that a sharded run trains like a single device
(the scale-out work extends this to every strategy and to several processes)."""

import json
import os
import subprocess
import sys

import jax
import pytest
from conftest import TINY_OVERRIDES
from jax.sharding import PartitionSpec as P

from lmjax.config import ConfigError, base_config
from lmjax.parallel.mesh import mesh_shape
from lmjax.parallel.rules import logical_to_spec, tree_specs

RULES = dict(base_config().mesh.rules)


def test_logical_axes_map_to_mesh_axes():
    sizes = {"data": 2, "fsdp": 2, "tensor": 2}
    assert logical_to_spec(("embed", "mlp"), RULES, sizes) == P("fsdp", "tensor")
    assert logical_to_spec(("batch", "length", "embed"), RULES, sizes) == P(("data", "fsdp"), None, None)
    assert logical_to_spec(("embed", "mlp"), RULES, {"data": 8, "fsdp": 1, "tensor": 1}) == P(None, None)
    assert logical_to_spec(("vocab", "embed"), RULES, sizes, shape=(97, 64)) == P(None, "fsdp")


def test_optimizer_moments_follow_their_parameter():
    params = {"w": jax.ShapeDtypeStruct((4, 8), "float32")}
    axes = {"w": ("embed", "mlp")}
    state = {"params": params, "opt": ({"mu": params, "nu": params}, {"count": jax.ShapeDtypeStruct((), "int32")})}
    specs = tree_specs({"data": 1, "fsdp": 2, "tensor": 2}, RULES, state, axes)
    assert specs["opt"][0]["mu"]["w"] == P("fsdp", "tensor") and specs["opt"][1]["count"] == P()


def test_mesh_shape_resolves_and_rejects():
    cfg = base_config().mesh
    cfg.update(data=-1, fsdp=2, tensor=2)
    assert mesh_shape(cfg, 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ConfigError, match="does not fit 6 devices"):
        mesh_shape(cfg, 6)


def _losses(tmp_path, name: str, devices: int, mesh: list[str]) -> list[float]:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    extra = ["train.steps=6", "train.log_every=1", "train.eval_every=0", "train.samples="]
    args = [f"--config.{o}" for o in TINY_OVERRIDES + extra + mesh]
    out = subprocess.run([sys.executable, "-m", "lmjax.cli", "train", "--config", "configs/tiny.py", *args,
                          "--workdir", str(tmp_path / name)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["train_loss"] for line in lines]


def test_data_fsdp_tensor_mesh_trains_like_one_device(tmp_path):
    single = _losses(tmp_path, "single", 1, [])
    sharded = _losses(tmp_path, "sharded", 8, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    # float32 everywhere; only the order of cross-device reductions differs.
    assert sharded == pytest.approx(single, abs=2e-4)

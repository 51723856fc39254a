"""Tiny training runs on several meshes in ONE process, for tests/test_sharding.py (which starts this
script with N forced CPU devices, so the runs share imports and the tokenizer).

    python tests/mesh_runs.py OUT_DIR JOBS_JSON

JOBS_JSON is a list of {"name", "overrides": [...], "resume_from": optional name of an earlier run
(its workdir is copied, checkpoints after `resume_step` removed, and training continues here)}.
Prints one JSON object: for every job its train losses by step, and for every job whose mesh has more
than one device the bytes of parameters and optimizer state one device holds (from the live arrays)
next to the unsharded total and `lmjax plan`'s figure.
"""

import functools
import json
import shutil
import sys
from pathlib import Path

import jax
from conftest import TINY_OVERRIDES

from lmjax.config import apply_overrides, base_config
from lmjax.model.params import abstract_model
from lmjax.parallel.mesh import make_mesh
from lmjax.parallel.rules import tree_shardings
from lmjax.train.loop import train
from lmjax.train.optim import make_optimizer
from lmjax.train.plan import plan
from lmjax.train.step import init_state

COMMON = ["train.log_every=1", "train.eval_every=0", "train.eval_steps=1", "train.samples=", "train.keep_ckpts=5"]


def losses(workdir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in records if "train_loss" in r}


def state_bytes(cfg) -> dict:
    """Per-device and total bytes of the live, sharded params and optimizer state of `cfg`, and the
    spec of every parameter."""
    cfg.model.vocab_size = cfg.tokenizer.vocab_size
    mesh, rules = make_mesh(cfg.mesh), dict(cfg.mesh.rules)
    _, _, axes = abstract_model(cfg.model)
    init = functools.partial(init_state, cfg.model, make_optimizer(cfg.train), 0)
    shardings = tree_shardings(mesh, rules, jax.eval_shape(init), axes)
    state = jax.jit(init, out_shardings=shardings)()
    device = jax.devices()[0]

    def on_device(tree) -> int:
        return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == device)

    expected = plan(cfg, jax.device_count())
    return {
        "param_bytes": on_device(state["params"]), "opt_bytes": on_device(state["opt_state"]),
        "total_param_bytes": sum(x.nbytes for x in jax.tree.leaves(state["params"])),
        "total_opt_bytes": sum(x.nbytes for x in jax.tree.leaves(state["opt_state"])),
        "plan_param_bytes": expected["param_bytes_per_device"], "plan_opt_bytes": expected["opt_bytes_per_device"],
        "param_specs": {"/".join(str(getattr(k, "key", k)) for k in path): str(x.sharding.spec)
                        for path, x in jax.tree_util.tree_flatten_with_path(state["params"])[0]},
    }


def main(out: str, jobs_json: str) -> None:
    out_dir, report = Path(out), {}
    tokenizer = ""
    for job in json.loads(jobs_json):
        workdir = out_dir / job["name"]
        overrides = TINY_OVERRIDES + COMMON + ([f"tokenizer.path={tokenizer}"] if tokenizer else []) + job["overrides"]
        cfg = apply_overrides(base_config(), overrides)
        if job.get("resume_from"):
            shutil.copytree(out_dir / job["resume_from"], workdir)
            for step_dir in (workdir / "checkpoints").iterdir():
                if step_dir.name.isdigit() and int(step_dir.name) > job["resume_step"]:
                    shutil.rmtree(step_dir)
        train(cfg, workdir)
        tokenizer = tokenizer or str(workdir / "tokenizer")
        report[job["name"]] = {"losses": losses(workdir)}
        if jax.device_count() > 1:
            report[job["name"]]["bytes"] = state_bytes(cfg)
    print("RESULT " + json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

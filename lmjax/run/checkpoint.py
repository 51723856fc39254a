"""Orbax checkpoints of the train state and the data iterator, written together per step.

Each checkpoint holds three items: `params` (what sampling needs), `train` (step, optimizer state,
RNG) and `loaders` (JSON: the position of every data loader of every process, lmjax/input/loaders.py,
written by the primary process only). Saves are asynchronous; Orbax writes into a temporary
directory and renames it when complete, so a run killed mid-save leaves the previous checkpoints intact.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import jax
import orbax.checkpoint as ocp

from lmjax.config import LmjaxError

State = Mapping[str, Any]  # {"step", "params", "opt_state", "rng"}


class Loaders(Protocol):
    """Data loaders whose positions travel with a checkpoint (lmjax/input/loaders.py)."""

    def state(self) -> dict[str, Any]: ...

    def restore(self, saved: dict[str, Any]) -> None: ...


class CheckpointError(LmjaxError, RuntimeError):
    """A checkpoint directory or step that cannot be read."""


class Checkpointer:
    """Saves and restores train states (with data loader positions) under `directory`."""

    def __init__(self, directory: str | Path, keep: int = 3):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self.manager.latest_step()

    def save(self, state: State, loaders: Loaders | None = None) -> None:
        """Starts an asynchronous save of `state` (and the loaders' positions) at its step; every process
        calls it."""
        step = int(jax.device_get(state["step"]))
        items = {
            "params": ocp.args.StandardSave(state["params"]),
            "train": ocp.args.StandardSave({k: state[k] for k in ("step", "opt_state", "rng")}),
        }
        if loaders is not None:
            items["loaders"] = ocp.args.JsonSave(loaders.state())
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def save_params(self, step: int, params: Any) -> None:
        """Saves parameters alone at `step` (a compressed run: it samples and serves but does not train on)."""
        self.manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)), force=True)

    def restore(self, abstract_state: State, loaders: Loaders | None = None, step: int | None = None) -> State:
        """The state at `step` (default: latest) laid out like `abstract_state` (shapes and shardings);
        moves this process's `loaders` to their saved positions."""
        step = self.resolve_step(step)
        items = {
            "params": ocp.args.StandardRestore(abstract_state["params"]),
            "train": ocp.args.StandardRestore({k: abstract_state[k] for k in ("step", "opt_state", "rng")}),
        }
        if loaders is not None:
            if not (self.directory / str(step) / "loaders").is_dir():
                raise CheckpointError(
                    f"checkpoint step {step} in {self.directory} holds no data loader positions (written by an "
                    f"older lmjax), so training cannot resume from it exactly; start a new run with "
                    f"--config.init_from={self.directory.parent} to continue from its parameters")
            items["loaders"] = ocp.args.JsonRestore()
        restored = self._restore(step, items)
        if loaders is not None:
            loaders.restore(restored["loaders"])
        return {"params": restored["params"], **restored["train"]}

    def restore_params(self, abstract_params: Any, step: int | None = None) -> Any:
        """Only the parameters (for sampling and fine-tuning)."""
        step = self.resolve_step(step)
        return self._restore(step, {"params": ocp.args.StandardRestore(abstract_params)})["params"]

    def close(self) -> None:
        """Waits for pending saves, then releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def resolve_step(self, step: int | None) -> int:
        """`step` if a complete checkpoint has it, the latest if `step` is None; CheckpointError otherwise."""
        steps = self.manager.all_steps()
        if not steps:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")
        if step is None:
            return max(steps)
        if step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; available: {sorted(steps)}")
        return step

    def _restore(self, step: int, items: dict) -> Any:
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} could not be read ({type(e).__name__}: "
                f"{str(e)[:300]}). It may be corrupt or from a different config; earlier steps: "
                f"{sorted(s for s in self.manager.all_steps() if s < step)}") from e

"""Independent data loaders shared out to processes, so the data order does not depend on how many
processes read it.

With `count` loaders (`data.loaders`), loader k reads shard k of the data and contributes
batch_size / count rows to every global batch; process p of P runs loaders [p * count / P,
(p + 1) * count / P). A single process running both loaders of a 2-loader run therefore produces the
same global batches as 2 processes running one each, and a checkpoint (the state of every loader)
resumes on any process count that divides `count`.
"""

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from lmjax.config import ConfigError
from lmjax.parallel.distributed import allgather_json

# (loader index, loader count, rows per batch) -> endless iterator of dict batches with get_state()/set_state()
MakeLoader = Callable[[int, int, int], Iterator[dict[str, np.ndarray]]]


def loader_count(requested: int, process_count: int, batch_size: int, micro_batches: int) -> int:
    """The number of loaders (`requested`, or one per process if 0); ConfigError if it does not fit."""
    count = requested or process_count
    if count % process_count:
        raise ConfigError(f"data.loaders ({count}) must be a multiple of the number of processes ({process_count}); "
                          f"a run resumes on any process count that divides its loader count")
    if batch_size % (count * micro_batches):
        raise ConfigError(f"train.batch_size ({batch_size}) must be divisible by data.loaders ({count}) times "
                          f"train.grad_accum ({micro_batches})")
    return count


class Loaders:
    """This process's loaders, read together as one iterator of its rows of each global batch.

    A batch is laid out micro-batch by micro-batch: reshaped to [micro_batches, rows / micro_batches],
    micro-batch a holds the a-th slice of every local loader's rows, so each global micro-batch also
    does not depend on the process count."""

    def __init__(self, make: MakeLoader, count: int, batch_size: int, micro_batches: int, process_index: int,
                 process_count: int, fingerprint: dict[str, Any] | None = None):
        """`fingerprint` names the data the loaders read (spec, sizes, tokenizer); a checkpoint of other data
        is refused on restore."""
        per_process = count // process_count
        self.count, self.micro_batches = count, micro_batches
        self.fingerprint = {"loaders": count, **(fingerprint or {})}
        self.ids = list(range(process_index * per_process, (process_index + 1) * per_process))
        self.iterators = [make(k, count, batch_size // count) for k in self.ids]

    def __iter__(self) -> "Loaders":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batches = [next(it) for it in self.iterators]
        a = self.micro_batches
        return {key: np.concatenate([b[key].reshape(a, -1, *b[key].shape[1:]) for b in batches], axis=1)
                .reshape(-1, *batches[0][key].shape[1:]) for key in batches[0]}

    def state(self) -> dict[str, Any]:
        """{"loaders": count, "fingerprint": {...}, "states": {loader id: state}} of every process's loaders
        (a collective)."""
        local = {str(k): it.get_state() for k, it in zip(self.ids, self.iterators, strict=True)}
        states = {k: v for part in allgather_json(local) for k, v in part.items()}
        return {"loaders": self.count, "fingerprint": self.fingerprint, "states": states}

    def restore(self, saved: dict[str, Any]) -> None:
        """Moves this process's loaders to their positions in `saved` (from `state()`)."""
        if saved["loaders"] != self.count:
            raise ConfigError(f"the checkpoint was written with {saved['loaders']} data loaders but data.loaders "
                              f"is {self.count}: set data.loaders={saved['loaders']} to resume it (the data order "
                              f"depends on it)")
        saved_print = saved.get("fingerprint")
        if saved_print is None:
            raise ConfigError("the checkpoint's data loader positions carry no fingerprint of their data (written by "
                              "an older lmjax), so they cannot be checked against this run's data; start a new run "
                              "with --config.init_from to continue from its parameters")
        changed = {k: (saved_print.get(k), v) for k, v in self.fingerprint.items() if saved_print.get(k) != v}
        if changed:
            raise ConfigError("the checkpoint's data loader positions belong to other data: "
                              + ", ".join(f"{k} {a!r} (checkpoint) != {b!r} (now)" for k, (a, b) in changed.items()))
        for k, it in zip(self.ids, self.iterators, strict=True):
            it.set_state(saved["states"][str(k)])

"""Building the device mesh from `mesh.{data,fsdp,tensor}`."""

import math
import re
from collections.abc import Mapping

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh
from ml_collections import ConfigDict

from lmjax.config import MESH_AXES, ConfigError
from lmjax.parallel.rules import DroppedAxis, path_names, resolve_spec


def mesh_shape(mesh_cfg: ConfigDict, num_devices: int) -> dict[str, int]:
    """Axis sizes with -1 resolved; raises ConfigError if they do not multiply to `num_devices`."""
    sizes = {a: mesh_cfg[a] for a in MESH_AXES}
    fixed = math.prod(s for s in sizes.values() if s != -1)
    for axis, size in sizes.items():
        if size == -1:
            if num_devices % fixed:
                raise ConfigError(f"mesh {sizes} does not fit {num_devices} devices: {fixed} does not divide it")
            sizes[axis] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ConfigError(f"mesh {sizes} has {math.prod(sizes.values())} devices but {num_devices} are present")
    return sizes


def make_mesh(mesh_cfg: ConfigDict, devices: list | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over all devices (all processes) or the given ones."""
    devices = jax.devices() if devices is None else devices
    sizes = mesh_shape(mesh_cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    if devices == jax.devices():
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    else:
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def batch_shards(rules: dict[str, str], sizes: dict[str, int]) -> int:
    """Devices a batch is split over: the product of the sizes of the mesh axes of the `batch` rule."""
    return math.prod(sizes[a] for a in filter(None, rules["batch"].split(",")))


def _path_name(path) -> str:
    return ".".join(path_names(path))


def dropped_shardings(shapes, axes, rules: Mapping[str, str],
                      sizes: Mapping[str, int]) -> list[tuple[str, tuple[int, ...], DroppedAxis]]:
    """(parameter name, shape, dropped mesh axis) for every mesh axis that `rules` assign to a dimension of a
    parameter (`shapes`: arrays or ShapeDtypeStructs; `axes`: the same tree of logical axis tuples) but that
    its sharding leaves out, so that the parameter is replicated along that mesh axis."""
    flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    flat_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
    found = []
    for (path, leaf), names in zip(flat_shapes, flat_axes, strict=True):
        for drop in resolve_spec(names, rules, sizes, leaf.shape)[1]:
            found.append((_path_name(path), tuple(leaf.shape), drop))
    return found


def check_model_fits_mesh(shapes, axes, rules: Mapping[str, str], sizes: Mapping[str, int],
                          required: Mapping[str, str]) -> list[str]:
    """Checks, before anything is compiled, how the mesh can shard the parameters (`shapes` and their logical
    `axes`, e.g. from `abstract_model`) under `rules`. Raises ConfigError when a mesh axis does not divide a
    dimension whose logical axis is in `required` ({logical axis: the knob that sizes it}): the model's
    tensor-parallel axes, where replication would repeat the work instead of splitting it. Every other
    dropped sharding (the parameter stays replicated along that mesh axis: more memory, same results) comes
    back as one log line per (mesh axis, logical axis, size), naming the parameters and dimensions."""
    drops = dropped_shardings(shapes, axes, rules, sizes)
    errors: dict[str, dict[str, str]] = {}  # mesh axis -> {logical axis: what it cannot split}
    groups: dict[tuple[str, str, int, int], dict[tuple[str, int], int]] = {}
    for name, shape, d in drops:
        size = shape[d.dim]
        if d.indivisible and d.logical in required:
            errors.setdefault(d.mesh_axis, {}).setdefault(
                d.logical, f"{required[d.logical]} = {size} (dimension {d.dim} of {name}, logical axis {d.logical!r})")
            continue
        pattern = re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", name)  # blocks.3.attn.key -> blocks.*.attn.key
        params = groups.setdefault((d.mesh_axis, d.logical, size, d.shards), {})
        params[(pattern, d.dim)] = params.get((pattern, d.dim), 0) + 1
    if errors:
        raise ConfigError("; ".join(
            f"the {axis} mesh axis ({sizes[axis]} devices) does not divide "
            + ", ".join(what[logical] for logical in required if logical in what)
            + f"; pick a mesh.{axis} that divides {'them' if len(what) > 1 else 'it'}"
            for axis, what in errors.items()))
    lines = []
    for (mesh_axis, logical, size, shards), params in groups.items():
        why = (f"does not divide logical axis {logical!r} of size {size}"
               + (f" into {shards} shards (with the mesh axes before it)" if shards != sizes[mesh_axis] else "")
               if shards else f"is already used by another dimension, so not by logical axis {logical!r}")
        where = ", ".join(f"{p} dim {dim}" + (f" (x{n})" if n > 1 else "") for (p, dim), n in params.items())
        lines.append(f"sharding dropped: the {mesh_axis} mesh axis ({sizes[mesh_axis]} devices) {why}; "
                     f"replicated along it: {where}")
    return lines

"""Building the device mesh from `mesh.{data,fsdp,tensor}`."""

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh
from ml_collections import ConfigDict

from lmjax.config import MESH_AXES, ConfigError


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


def check_model_fits_mesh(model_cfg: ConfigDict, sizes: dict[str, int]) -> None:
    """Raises ConfigError, before anything is compiled, when the `tensor` mesh axis does not divide the
    query heads, the key/value heads or d_ff, which tensor parallelism splits across its devices."""
    tensor = sizes.get("tensor", 1)
    for what, value in (("model.num_heads", model_cfg.num_heads),
                        ("the key/value heads (model.num_kv_heads)", model_cfg.num_kv_heads or model_cfg.num_heads),
                        ("model.d_ff", model_cfg.d_ff)):
        if value % tensor:
            raise ConfigError(f"the tensor mesh axis ({tensor} devices) does not divide {what} = {value}; "
                              f"pick a mesh.tensor that divides it")

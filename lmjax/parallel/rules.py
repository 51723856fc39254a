"""Logical axis names -> mesh axes.

Model code names the axes of every parameter and activation with logical names (`embed`, `mlp`,
`heads`, ...). The config's `mesh.rules` map each logical name to zero or more mesh axes, so the same
model runs replicated on one CPU or FSDP x tensor-parallel on a pod. Activation constraints apply only
inside `use_rules(mesh, rules)`; outside it (tests, plain CPU calls) `constrain` is the identity.
"""

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LogicalAxes = Sequence[str | None]

_active: list[tuple[Mesh, Mapping[str, str]]] = []


@dataclasses.dataclass(frozen=True)
class DroppedAxis:
    """A mesh axis that the rules assign to dimension `dim` (logical axis `logical`) of an array but that its
    spec leaves out: the axis does not divide the dimension into `shards` parts (with the mesh axes before
    it on that dimension), or an earlier dimension of the array already uses it (`shards` is then 0)."""

    dim: int
    logical: str
    mesh_axis: str
    shards: int

    @property
    def indivisible(self) -> bool:
        """Whether the axis was dropped because it does not divide the dimension."""
        return self.shards > 0


def resolve_spec(
    axes: LogicalAxes, rules: Mapping[str, str], mesh_shape: Mapping[str, int] | None = None,
    shape: Sequence[int] | None = None,
) -> tuple[PartitionSpec, list[DroppedAxis]]:
    """`logical_to_spec`, and the mesh axes it dropped (none for size-1 axes, which shard nothing)."""
    used: set[str] = set()
    spec, dropped = [], []
    for i, name in enumerate(axes):
        mesh_axes = []
        size = 1
        for axis in filter(None, rules.get(name, "").split(",")) if name else ():
            if mesh_shape is not None and mesh_shape[axis] == 1:
                continue
            if axis in used:
                dropped.append(DroppedAxis(i, name, axis, 0))
                continue
            if mesh_shape is not None:
                if shape is not None and shape[i] % (size * mesh_shape[axis]):
                    dropped.append(DroppedAxis(i, name, axis, size * mesh_shape[axis]))
                    continue
                size *= mesh_shape[axis]
            mesh_axes.append(axis)
            used.add(axis)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else tuple(mesh_axes))
    return PartitionSpec(*spec), dropped


def logical_to_spec(
    axes: LogicalAxes, rules: Mapping[str, str], mesh_shape: Mapping[str, int] | None = None,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """PartitionSpec for logical `axes`. A mesh axis is used at most once per spec; with the mesh's axis
    sizes, size-1 axes are left out, and with `shape` too, mesh axes that do not divide their dimension
    are dropped (that dimension stays replicated). `resolve_spec` also returns what was dropped."""
    return resolve_spec(axes, rules, mesh_shape, shape)[0]


def named_sharding(mesh: Mesh, rules: Mapping[str, str], axes: LogicalAxes,
                   shape: Sequence[int] | None = None) -> NamedSharding:
    """NamedSharding on `mesh` for an array with logical `axes`."""
    return NamedSharding(mesh, logical_to_spec(axes, rules, mesh.shape, shape))


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: Mapping[str, str]) -> Iterator[None]:
    """Makes `constrain` place activations on `mesh` by `rules` while tracing inside this block."""
    _active.append((mesh, dict(rules)))
    try:
        yield
    finally:
        _active.pop()


def active_mesh() -> tuple[Mesh, Mapping[str, str]] | None:
    """The mesh and rules of the innermost `use_rules` block, or None outside one."""
    return _active[-1] if _active else None


def constrain(x: jax.Array, axes: LogicalAxes) -> jax.Array:
    """Sharding constraint on an activation by logical axis names (identity outside `use_rules`)."""
    if not _active:
        return x
    mesh, rules = _active[-1]
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, rules, axes, x.shape))


def path_names(path) -> tuple[str, ...]:
    """The names along a pytree key path: dict keys, attribute names and sequence indices, as strings."""
    return tuple(jax.tree_util.keystr((key,), simple=True, separator="") for key in path)


def tree_specs(mesh_shape: Mapping[str, int], rules: Mapping[str, str], tree, param_axes) -> object:
    """PartitionSpecs for any tree built around the parameters (params, optimizer moments, train
    state): a leaf whose key path ends with a parameter's path and has its rank is laid out like that
    parameter; everything else (step counters, RNG) is replicated."""
    axes_by_path = {
        path_names(path): axes
        for path, axes in jax.tree_util.tree_flatten_with_path(
            param_axes, is_leaf=lambda x: isinstance(x, tuple))[0]
    }
    longest = max((len(p) for p in axes_by_path), default=0)

    def spec(path, leaf):
        names = path_names(path)
        for n in range(min(longest, len(names)), 0, -1):
            axes = axes_by_path.get(names[-n:])
            if axes is not None and len(axes) == len(leaf.shape):
                return logical_to_spec(axes, rules, mesh_shape, leaf.shape)
        return PartitionSpec()

    return jax.tree_util.tree_map_with_path(spec, tree)


def tree_shardings(mesh: Mesh, rules: Mapping[str, str], tree, param_axes) -> object:
    """NamedShardings on `mesh` for the leaves of `tree` (see `tree_specs`)."""
    specs = tree_specs(mesh.shape, rules, tree, param_axes)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))

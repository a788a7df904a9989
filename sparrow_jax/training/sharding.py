"""Logical-axis sharding (MaxText style): every parameter declares its logical axes where it is made
(`models.layers.axes_metadata`); one rules table maps logical names to mesh axes; every PartitionSpec
is derived from the parameters themselves. Changing parallelism = editing RULES. Shared by the trainer
(draft, optimizer state, the online target) and usable for inference."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from sparrow_jax.models.layers import declared_axes

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of axes, or None = replicated)
RULES = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "embed2": "fsdp",  # the draft FC's 2H input
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "norm": None,
    "patch": None,  # flattened pixel patches into a patch embedding
    "positions": None,  # rows of a position-embedding table
}


def make_mesh(shape=(1, 1, 1), devices=None):
    """A (data, fsdp, tensor) mesh with Auto axis types (sharding propagates through jit)."""
    devices = devices if devices is not None else jax.devices()
    n = int(np.prod(shape))
    if n != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {n} devices, {len(devices)} present")
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _path_name(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def logical_axes(path, variable) -> tuple[str, ...]:
    """The logical axes `variable` (at `path` in its state) declared; an error naming the parameter
    when it declared none, declared the wrong number, or used a name RULES does not know."""
    name = _path_name(path)
    if not isinstance(variable, nnx.Variable):
        raise ValueError(f"parameter {name}: a bare array, not an nnx Variable (no logical axes to read)")
    axes = declared_axes(variable)
    if axes is None:
        raise ValueError(f"parameter {name}: no logical axes declared where it is created "
                         "(use models.layers.axes_metadata)")
    if len(axes) != variable.ndim:
        raise ValueError(f"parameter {name}: logical axes {axes} for a {variable.ndim}-d parameter {variable.shape}")
    unknown = [a for a in axes if a not in RULES]
    if unknown:
        raise ValueError(f"parameter {name}: logical axes {unknown} have no entry in sharding.RULES")
    return tuple(axes)


def spec_for(axes, shape, mesh) -> P:
    """PartitionSpec from logical axes; a dimension the mesh axes do not divide stays replicated."""
    out, used = [], set()
    for ax, dim in zip(axes, shape):
        mesh_ax = RULES.get(ax)
        names = () if mesh_ax is None else (mesh_ax,) if isinstance(mesh_ax, str) else tuple(mesh_ax)
        names = tuple(n for n in names if n not in used)
        size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
        if names and dim % size == 0:
            out.append(names if len(names) > 1 else names[0])
            used.update(names)
        else:
            out.append(None)
    return P(*out)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_specs(state, mesh):
    """PartitionSpec of every parameter of an nnx State, from its declared axes and RULES (same tree,
    each Variable holding its spec)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, v: v.replace(spec_for(logical_axes(path, v), v.shape, mesh)), state, is_leaf=_is_variable)


def state_shardings(state, mesh):
    """NamedSharding of every parameter of an nnx State (same tree, each Variable holding its sharding)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), state_specs(state, mesh))


def batch_sharding(mesh, ndim: int):
    return NamedSharding(mesh, P(RULES["batch"], *([None] * (ndim - 1))))


def replicated(mesh):
    return NamedSharding(mesh, P())


__all__ = ["MESH_AXES", "RULES", "make_mesh", "logical_axes", "spec_for", "state_specs", "state_shardings",
           "batch_sharding", "replicated"]

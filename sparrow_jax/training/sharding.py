"""Logical-axis sharding (MaxText style): parameters get logical axis names from their role, one rules
table maps logical names to mesh axes. Changing parallelism = editing RULES. Shared by the trainer
(draft, optimizer state, the online target) and usable for inference."""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of axes, or None = replicated)
RULES = {
    "batch": ("data", "fsdp"),
    "embed": "fsdp",
    "embed2": "fsdp",  # the FC's 2H input
    "heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "norm": None,
    "patch": None,
}

# (name fragment, kernel axes, bias axes); first match wins. Kernels are [in, out].
_ROLE_AXES = (
    (("q_proj", "k_proj", "v_proj", "qkv"), ("embed", "heads"), ("heads",)),
    (("o_proj", "attn.proj"), ("heads", "embed"), ("embed",)),
    (("gate_proj", "up_proj", "fc1"), ("embed", "mlp"), ("mlp",)),
    (("down_proj", "fc2"), ("mlp", "embed"), ("embed",)),
    (("lm_head",), ("embed", "vocab"), ("vocab",)),
    (("patch_embed",), ("patch", "embed"), ("embed",)),
    (("fc",), ("embed2", "embed"), ("embed",)),
)


def make_mesh(shape=(1, 1, 1), devices=None):
    """A (data, fsdp, tensor) mesh with Auto axis types (sharding propagates through jit)."""
    from jax.sharding import AxisType  # noqa: PLC0415

    devices = devices if devices is not None else jax.devices()
    n = int(np.prod(shape))
    if n != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {n} devices, {len(devices)} present")
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_axes(path, ndim: int):
    name = ".".join(str(p) for p in path)
    leaf = str(path[-1])
    if leaf == "embedding":
        return ("vocab", "embed")
    for frags, k_axes, b_axes in _ROLE_AXES:
        if any(f in name for f in frags):
            if leaf == "kernel" and ndim == 2:
                return k_axes
            if leaf == "bias" and ndim == 1:
                return b_axes
    return ("norm",) * ndim


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


def state_shardings(state, mesh):
    """NamedSharding pytree for an nnx State (or any pytree with paths)."""
    def one(path, x):
        keys = tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
        return NamedSharding(mesh, spec_for(logical_axes(keys, x.ndim), x.shape, mesh))
    return jax.tree_util.tree_map_with_path(one, state)


def batch_sharding(mesh, ndim: int):
    return NamedSharding(mesh, P(RULES["batch"], *([None] * (ndim - 1))))


def replicated(mesh):
    return NamedSharding(mesh, P())


__all__ = ["MESH_AXES", "RULES", "make_mesh", "logical_axes", "spec_for", "state_shardings", "batch_sharding",
           "replicated", "nnx"]

"""Sharded inference (issue 12 §2): where a decode's arrays live on a (data, fsdp, tensor) mesh.

The target runs tensor-parallel: its parameters are placed from their declared logical axes and
`training.sharding.RULES` (heads, KV heads, MLP and vocab split on `tensor`; fsdp is 1 here, so
`embed` stays whole); its KV cache is split by KV head on `tensor` and by row on `data`; the draft is
replicated (small: its cache is split by row only). Every jitted decode program (prefill, draft
prefill, the AR loop, the speculative loop) has a sharded twin built from a `Placement` with explicit
in/out shardings and donated caches; `Placement` is a hashable value, so it keys those programs.

`check_mesh` is the one parser and validator of the user's mesh text ("data=1,tensor=8"), shared by
decode.py --mesh and DecodeConfig.mesh."""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec as P

from sparrow_jax.models import registry
from sparrow_jax.models.kv_cache import KVCache
from sparrow_jax.training import sharding as shd

MESH_KEYS = ("data", "tensor")  # what a user sets; fsdp stays 1 in inference (no weight all-gathers per step)
MESH_SYNTAX = "data=D,tensor=T (e.g. data=1,tensor=8; an axis left out is 1)"


class MeshError(ValueError):
    """A mesh that cannot run a decode: bad syntax, wrong device count, a split the target cannot take."""


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    data: int = 1
    tensor: int = 1

    @property
    def shape(self) -> tuple[int, int, int]:
        """In `sharding.MESH_AXES` order (data, fsdp, tensor)."""
        return (self.data, 1, self.tensor)

    @property
    def size(self) -> int:
        return self.data * self.tensor

    def __str__(self):
        return f"data={self.data},tensor={self.tensor}"


def parse_mesh(text: str, name: str = "mesh") -> MeshSpec:
    """ "data=1,tensor=8" -> MeshSpec; an error naming `name` otherwise."""
    sizes = {}
    for part in str(text).replace(" ", "").split(","):
        m = re.fullmatch(r"([a-z]+)=(\d+)", part)
        if m is None or m[1] not in MESH_KEYS or m[1] in sizes:
            raise MeshError(f"{name} {text!r}: expected {MESH_SYNTAX}")
        sizes[m[1]] = int(m[2])
        if sizes[m[1]] < 1:
            raise MeshError(f"{name} {text!r}: {m[1]} must be >= 1")
    return MeshSpec(**sizes)


def rules_replicate(cfg, spec: MeshSpec) -> list[str]:
    """Parameters of `cfg`'s target (built abstractly: no weights) with a logical axis that RULES puts
    on a mesh axis of `spec` whose size does not divide it, so `spec_for` leaves it replicated."""
    state = nnx.state(nnx.eval_shape(lambda: registry.build_target(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    mesh = AbstractMesh(spec.shape, shd.MESH_AXES)
    out = []
    for path, v in nnx.to_flat_state(state):
        axes = shd.logical_axes(path, v)
        got = shd.spec_for(axes, v.shape, mesh)
        lost = [f"{a} {d}" for a, d, s in zip(axes, v.shape, got)
                if s is None and shd.RULES.get(a) is not None and _size(mesh, shd.RULES[a]) > 1]
        if lost:
            out.append(f"{'.'.join(map(str, path))} ({', '.join(lost)})")
    return out


def _size(mesh, axes) -> int:
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    return int(np.prod([mesh.shape[n] for n in names]))


def check_mesh(text, cfg=None, *, devices=None, batch: int | None = None, name: str = "mesh") -> MeshSpec | None:
    """The one check of a user's mesh (None: no mesh, the single-device path). Syntax; then with
    `devices` that data*tensor is their count; with the target's `cfg` that `tensor` divides its
    attention heads and KV heads (else a head would be cut across devices and the KV cache left
    whole: the message lists what the rules would replicate); with `batch` that `data` divides the rows."""
    if text is None:
        return None
    spec = text if isinstance(text, MeshSpec) else parse_mesh(text, name)
    if devices is not None and spec.size != len(devices):
        hint = (" (on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N before starting Python)"
                if devices and devices[0].platform == "cpu" else "")
        raise MeshError(f"{name} {spec}: needs data*tensor = {spec.size} devices, {len(devices)} present{hint}")
    if cfg is not None and spec.tensor > 1:
        t = cfg.text
        bad = [f"{n} {what}" for n, what in ((t.num_attention_heads, "attention heads"),
                                             (t.num_key_value_heads, "KV heads")) if n % spec.tensor]
        if bad:
            rep = rules_replicate(cfg, spec)
            shown = "; ".join(rep[:6]) + (f"; ... {len(rep) - 6} more" if len(rep) > 6 else "")
            cache = (f"the KV cache would stay whole ({t.num_key_value_heads} KV heads)"
                     if t.num_key_value_heads % spec.tensor else "the KV cache would be split")
            raise MeshError(f"{name} {spec}: tensor={spec.tensor} does not divide the target's {' and '.join(bad)}: "
                            f"{cache}, the q/k/v/o kernels would be cut inside a head, and the rules would replicate "
                            f"{len(rep)} parameter(s){': ' + shown if rep else ''}; use a tensor size that divides "
                            f"{math.gcd(t.num_attention_heads, t.num_key_value_heads)}")
    if batch is not None and batch % spec.data:
        raise MeshError(f"{name} {spec}: a batch of {batch} row(s) does not split over data={spec.data} "
                        f"(pass a multiple of {spec.data} rows)")
    return spec


def make_mesh(spec: MeshSpec, devices=None) -> Mesh:
    return shd.make_mesh(spec.shape, devices)


def put(args, shardings):
    """device_put each argument onto its in_sharding (a no-op for arrays already there): jit refuses
    committed arrays placed otherwise."""
    return tuple(a if a is None else jax.device_put(a, s) for a, s in zip(args, shardings))


@dataclasses.dataclass(frozen=True)
class Placement:
    """Shardings of a decode on `mesh` (hashable: it keys the sharded programs). `target_tree` /
    `target_specs`: the target parameters' PartitionSpecs (from their declared axes and RULES) as a
    tree structure and its leaves."""

    mesh: Mesh
    target_tree: jax.tree_util.PyTreeDef
    target_specs: tuple
    put = staticmethod(put)  # for callers that cannot import this module (models.target)

    @classmethod
    def for_target(cls, tparams, mesh: Mesh) -> Placement:
        specs = shd.state_specs(tparams, mesh)
        leaves, tree = jax.tree.flatten(specs, is_leaf=lambda x: isinstance(x, P))
        return cls(mesh, tree, tuple(leaves))

    def named(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    @property
    def target_params(self):
        """The target's parameter shardings (an nnx State of NamedShardings)."""
        return jax.tree.unflatten(self.target_tree, [self.named(s) for s in self.target_specs])

    @property
    def replicated(self) -> NamedSharding:
        return self.named(P())

    @property
    def rows(self) -> NamedSharding:
        """Arrays whose leading axis is the batch: rows over the data axes, the rest whole."""
        return self.named(P(shd.RULES["batch"]))

    @property
    def target_cache(self) -> KVCache:
        """Sharding prefix of the target's KVCache: [B, S, K, E] rows on data, KV heads on tensor."""
        kv = self.named(P(shd.RULES["batch"], None, shd.RULES["kv_heads"], None))
        return KVCache(kv, kv, self.rows, self.rows)

    @property
    def draft_cache(self) -> KVCache:
        """The draft is replicated: its cache is split by row only."""
        return KVCache(self.rows, self.rows, self.rows, self.rows)

    def check_rows(self, batch: int) -> None:
        data = _size(self.mesh, shd.RULES["batch"])
        if batch % data:
            raise MeshError(f"mesh data={data}: a batch of {batch} row(s) does not split over it "
                            f"(pass a multiple of {data} rows)")


def place_model(model, shardings) -> None:
    """Move a model's parameters onto `shardings` (a tree prefix of its nnx.Param state), in place."""
    nnx.update(model, jax.device_put(nnx.state(model), shardings))


__all__ = ["MESH_KEYS", "MeshError", "MeshSpec", "Placement", "check_mesh", "make_mesh", "parse_mesh",
           "place_model", "put", "rules_replicate"]

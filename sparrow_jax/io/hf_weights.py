"""Safetensors checkpoint directories <-> NNX models, the part every target family shares: reading a
single or sharded set of tensors, filling an abstract model from them (every missing, unexpected or
wrongly shaped key an error naming it), writing them (sharded with an index when asked). Safetensors
only, never pickle. Each family's key map, loader and saver live in its package (`<family>/checkpoint.py`).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file


class CheckpointError(ValueError):
    """A checkpoint directory that does not match the model it claims to hold."""


def _tensor_files(d: Path) -> dict[str, Path]:
    """Map every tensor name to its file (single file or sharded index)."""
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e})") from None
        for f in sorted(set(wm.values())):
            if not (d / f).is_file():
                raise CheckpointError(f"{index}: shard {f} is missing")
        return {k: d / f for k, f in wm.items()}
    single = d / "model.safetensors"
    if single.is_file():
        try:
            with safe_open(str(single), "np") as f:
                return {k: single for k in f.keys()}
        except Exception as e:  # truncated / corrupt header
            raise CheckpointError(f"{single}: cannot read safetensors ({type(e).__name__}: {e})") from None
    if list(d.glob("*.bin")) or list(d.glob("*.pt")):
        raise CheckpointError(f"{d}: only pickle weights (*.bin/*.pt) found; convert them to safetensors")
    raise CheckpointError(f"{d}: no model.safetensors or model.safetensors.index.json")


def read_tensors(d: Path, normalize=lambda k: k) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint as numpy (bf16 stays bf16 via ml_dtypes), keys normalized by
    `normalize` (the family's in-memory -> on-disk key map)."""
    files = _tensor_files(d)
    out, by_file = {}, {}
    for k, f in files.items():
        by_file.setdefault(f, []).append(k)
    for f, keys in by_file.items():
        try:
            with safe_open(str(f), "flax") as fh:
                for k in keys:
                    out[normalize(k)] = np.asarray(fh.get_tensor(k))
        except Exception as e:  # safetensors raises several types for truncated/corrupt files
            raise CheckpointError(f"{f}: cannot read safetensors ({type(e).__name__}: {e})") from None
    return out


def fill_model(model, tensors: dict, d: Path, dtype, *, hf_name, to_ours, to_hf):
    """Fill an abstract model from checkpoint tensors; every missing, unexpected or misshaped key is a
    CheckpointError naming it (shared by every family's loader)."""
    wanted = {hf_name(p): (p, v) for p, v in nnx.to_flat_state(nnx.state(model))}
    missing = sorted(set(wanted) - set(tensors))
    unexpected = sorted(set(tensors) - set(wanted))
    if missing:
        raise CheckpointError(f"{d}: missing weight key(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        raise CheckpointError(f"{d}: unexpected weight key(s) {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    values = []
    for name, (p, v) in wanted.items():
        w = to_ours(name, tensors[name])
        if tuple(w.shape) != tuple(v.shape):
            raise CheckpointError(f"{d}: weight {name} has shape {tuple(tensors[name].shape)}, "
                                  f"config.json implies {tuple(to_hf(name, np.zeros(v.shape)).shape)}")
        values.append((p, v.replace(jnp.asarray(w, dtype=dtype))))
    nnx.update(model, nnx.from_flat_state(values))
    return model


def save_tensors(tensors: dict, hf_cfg: dict, d: Path, *, max_shard_bytes: int | None = None) -> None:
    """config.json (with the tensors' dtype) + model.safetensors, or shards with an index when
    `max_shard_bytes` is given, in `d` (created)."""
    d.mkdir(parents=True, exist_ok=True)
    hf_cfg = {**hf_cfg, "dtype": str(next(iter(tensors.values())).dtype)}
    (d / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    if not max_shard_bytes:
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        return
    shards, cur, size = [], {}, 0
    for k, t in tensors.items():
        if cur and size + t.nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = t
        size += t.nbytes
    shards.append(cur)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(d / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.nbytes for t in tensors.values())
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))

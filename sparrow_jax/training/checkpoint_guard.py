"""Training under faults: checkpoints that verify, values that stay finite, logs without repeats.

* File checksums: once a step's checkpoint is finalized, `seal` writes the SHA-256 of each of its files
  into `sparrow_checksums.json` inside the step folder; `verify_files` checks them before a restore
  (a truncated, emptied or bit-flipped file is named).
* State fingerprint: `state_fingerprint` hashes every array of the saved state (per leaf, on device,
  so sharded and multi-process states work) and the hash travels inside the checkpoint's own JSON
  metadata, written atomically with it; `fingerprint_mismatch` compares after a restore. It covers a
  step killed before it was sealed.
* `describe_failure`: when orbax cannot read a step at all, the file that is damaged (invalid JSON,
  empty file, or the path orbax names) in one line.
* `check_finite` / `nonfinite_tensors`: non-finite loss or gradients stop training before anything is
  saved; non-finite weights are never exported.
* `trim_metrics`: after a resume, metrics.jsonl keeps one line per step (steps re-run are not repeated).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

CHECKSUM_FILE = "sparrow_checksums.json"


class CheckpointDamagedError(RuntimeError):
    """No checkpoint of the run verifies; the message says how to recover."""


class NonFiniteError(RuntimeError):
    """A training step produced a non-finite loss or gradient norm."""


def _one_line(text) -> str:
    return " ".join(str(text).split())


# ------------------------------------------------------------------------------- file checksums


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != CHECKSUM_FILE)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def seal(step_dir) -> bool:
    """Write the checksums of a finalized step's files (once; atomic rename). True if written now."""
    step_dir = Path(step_dir)
    target = step_dir / CHECKSUM_FILE
    if target.exists():
        return False
    sums = {str(p.relative_to(step_dir)): {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in _files(step_dir)}
    tmp = step_dir / (CHECKSUM_FILE + ".tmp")
    tmp.write_text(json.dumps(sums, indent=1))
    os.replace(tmp, target)
    return True


def verify_files(step_dir) -> str | None:
    """None if the step's files match their checksums (or the step was never sealed), else the damage."""
    step_dir = Path(step_dir)
    path = step_dir / CHECKSUM_FILE
    if not path.exists():
        return None
    try:
        sums = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return f"{CHECKSUM_FILE}: unreadable ({type(exc).__name__})"
    for rel, want in sums.items():
        p = step_dir / rel
        if not p.is_file():
            return f"{rel}: missing"
        size = p.stat().st_size
        if size != want["bytes"]:
            return f"{rel}: {size} bytes, {want['bytes']} when saved (truncated or overwritten)"
        if _sha256(p) != want["sha256"]:
            return f"{rel}: contents differ from the checksum written when it was saved"
    return None


def describe_failure(step_dir, exc: BaseException) -> str:
    """One line naming the damaged file of a step orbax could not restore."""
    step_dir = Path(step_dir)
    for p in _files(step_dir):
        rel = str(p.relative_to(step_dir))
        if p.stat().st_size == 0:
            return f"{rel}: empty file"
        if "metadata" in p.name.lower() or p.name.startswith("_") or p.parent.name == "array_metadatas":
            try:
                json.loads(p.read_bytes())
            except (ValueError, UnicodeDecodeError):
                return f"{rel}: not valid JSON (truncated?)"
    chain, x = [], exc
    while x is not None and len(chain) < 20:  # orbax wraps the tensorstore error that names the array
        chain.append(x)
        x = x.__cause__ or x.__context__
    texts = [_one_line(e) for e in chain]
    for text in texts:
        m = re.search(r'Error reading "([^"]+)" in OCDBT database at local file "([^"]+)"', text)
        if m:
            where = Path(m.group(2)).relative_to(step_dir) if m.group(2).startswith(str(step_dir)) else m.group(2)
            detail = text.split(":", 1)[0] if ":" in text else type(chain[-1]).__name__
            return f"{where}: array {m.group(1)} unreadable ({detail}: its data file is truncated or damaged)"
    for text in texts:
        for m in re.finditer(re.escape(str(step_dir)) + r"/([^\s'\"]+)", text):
            rel = m.group(1).rstrip(".,:;)")
            if (step_dir / rel).is_file():
                return f"{rel}: unreadable ({type(exc).__name__})"
    return f"unreadable ({type(chain[-1]).__name__}: {texts[-1][:200]})"


def move_aside(step_dir, damaged_root) -> Path:
    """Move a damaged step out of the checkpoint folder (kept for inspection, never restored again)."""
    damaged_root = Path(damaged_root)
    damaged_root.mkdir(parents=True, exist_ok=True)
    dest, i = damaged_root / Path(step_dir).name, 1
    while dest.exists():
        dest, i = damaged_root / f"{Path(step_dir).name}.{i}", i + 1
    shutil.move(str(step_dir), str(dest))
    return dest


# ----------------------------------------------------------------------------- state fingerprint


def _leaf_hash(x) -> jax.Array:
    """uint32 hash of an array's bits: sum of bits x odd position weights (mod 2^32), so any single
    flipped bit, and any moved value, changes it. An integrity check, not a cryptographic one."""
    x = jnp.ravel(x)
    if x.dtype == jnp.bool_:
        u = x.astype(jnp.uint32)
    else:
        width = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
        u = jax.lax.bitcast_convert_type(x, width).astype(jnp.uint32)
    w = jnp.arange(u.shape[0], dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
    return jnp.sum(u * w, dtype=jnp.uint32) ^ jnp.uint32(u.shape[0] & 0xFFFFFFFF)


def state_fingerprint(state, sharding=None) -> dict[str, int]:
    """{leaf path: uint32 hash} of every array in `state` (computed where the arrays live)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(state)
    names = [jax.tree_util.keystr(path) for path, _ in leaves]
    fn = jax.jit(lambda xs: jnp.stack([_leaf_hash(x) for x in xs]), out_shardings=sharding)
    hashes = np.asarray(jax.device_get(fn([x for _, x in leaves])))
    return {n: int(h) for n, h in zip(names, hashes)}


def fingerprint_mismatch(state, expected: dict, sharding=None) -> str | None:
    """None if `state` hashes as `expected` (a checkpoint's saved fingerprint), else the first leaf that differs."""
    got = state_fingerprint(state, sharding)
    if set(got) != set(expected):
        return f"state layout differs from the saved checksum ({len(got)} arrays vs {len(expected)})"
    for name, h in got.items():
        if h != int(expected[name]):
            return f"state{name}: values differ from the checksum saved with the checkpoint (corrupted data file)"
    return None


# -------------------------------------------------------------------------------- finite values


def check_finite(step: int, metrics: dict, last_saved: int | None) -> None:
    """Raise NonFiniteError naming the step if the loss or the gradient norm is not finite."""
    bad = {k: float(metrics[k]) for k in ("loss", "grad_norm") if k in metrics and not math.isfinite(float(metrics[k]))}
    if bad:
        what = ", ".join(f"{k} {v}" for k, v in bad.items())
        kept = f"the last checkpoint is step {last_saved}" if last_saved is not None else "no checkpoint was written"
        raise NonFiniteError(f"step {step}: {what} — training stopped before saving or exporting anything from this "
                             f"step ({kept}); lower lr, raise clip, or check the data / the restored checkpoint")


def nonfinite_tensors(tree) -> list[str]:
    """Paths of the floating arrays in `tree` holding NaN or Inf."""
    out = []
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.asarray(jax.device_get(x))
        if np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16":
            if not np.isfinite(a.astype(np.float32)).all():
                out.append(jax.tree_util.keystr(path))
    return out


# ----------------------------------------------------------------------------------- metrics log


def trim_metrics(path, last_step: int) -> int:
    """Keep the lines of metrics.jsonl up to `last_step` (the step resumed from), one per step; drop a
    line cut off by a kill. Returns the number of lines removed."""
    path = Path(path)
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    kept, seen = [], set()
    for line in lines:
        try:
            step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
        if step <= last_step and step not in seen:
            seen.add(step)
            kept.append(line)
    if len(kept) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(x + "\n" for x in kept))
        os.replace(tmp, path)
    return len(lines) - len(kept)

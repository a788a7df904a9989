"""Compiled CPU kernels behind `sparrow_jax.models.attention` (the XLA path's CPU fast path).

XLA:CPU runs a decode step's cache read — two skinny products over the whole committed K/V — as separate
GEMMs at about half the bandwidth a streaming read of the cache reaches on the same machine, and that read is
most of a long-video decode step. `decode_attention.cc` is one XLA FFI custom call that reads each committed
key and value row once, in the cache's own [B, S, K, E] layout, split over XLA's intra-op thread pool, and
returns the online-softmax partial that `attention.cached_attention` merges with the new block's keys.

Built on first use: the C++ source is compiled with the machine's C++ compiler (`$CXX`, else g++ / c++ /
clang++; `-O3 -march=native`) into a cache directory (`$SPARROW_JAX_KERNEL_CACHE`, else
`~/.cache/sparrow_jax/cpu_kernels`), keyed by the source, compiler, jaxlib and CPU flags, then registered with
`jax.ffi`. Without a compiler, or with `SPARROW_JAX_CPU_KERNELS=0`, `load()` says why and attention runs its
plain-XLA path (same function; outputs equal up to fp32 rounding).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

log = logging.getLogger("cpu_kernels")

SOURCE = Path(__file__).with_name("decode_attention.cc")
TARGET = "sparrow_decode_attention"
MAX_ROWS = 64  # query rows per KV head the kernel takes (kMaxRows in the source)
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC", "-w")


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def cache_dir() -> Path:
    return Path(os.environ.get("SPARROW_JAX_KERNEL_CACHE") or Path.home() / ".cache" / "sparrow_jax" / "cpu_kernels")


def _build(cxx: str) -> Path:
    """The compiled library for this source, compiler, jaxlib and CPU (compiled once, then reused)."""
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cxx, version, jax.__version__, " ".join(FLAGS),
                                    _cpu_flags()]).encode()).hexdigest()[:16]
    out = cache_dir() / f"decode_attention-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # compile aside, then move: concurrent builds are safe
        tmp_out = Path(tmp) / out.name
        cmd = [cxx, *FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", str(tmp_out)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp_out, out)
    return out


@functools.cache
def load() -> tuple[bool, str]:
    """(True, "") once the kernel is compiled and registered with jax.ffi; else (False, why). Logged once."""
    import ctypes

    if os.environ.get("SPARROW_JAX_CPU_KERNELS", "1") == "0":
        return False, "disabled by SPARROW_JAX_CPU_KERNELS=0"
    cxx = _compiler()
    if cxx is None:
        why = "no C++ compiler (set CXX, or install g++)"
    else:
        try:
            lib = ctypes.CDLL(str(_build(cxx)))
            jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.SparrowDecodeAttention), platform="cpu")
            return True, ""
        except (OSError, RuntimeError, AttributeError) as e:
            why = f"build or load failed: {e}"
    log.warning("CPU decode-attention kernel unavailable (%s); attention runs its plain XLA path", why)
    return False, why


def supports(q_BTHE, k_BSKE, rows_per_kv_head: int) -> bool:
    """Whether the kernel takes this cache read: fp32, at most MAX_ROWS query rows per KV head, a CPU default
    backend and a kernel that built."""
    return (q_BTHE.dtype == jnp.float32 and k_BSKE.dtype == jnp.float32 and rows_per_kv_head <= MAX_ROWS
            and jax.default_backend() == "cpu" and load()[0])


def decode_attention_partial(q_BKME, k_BSKE, v_BSKE, kv_len_B):
    """Online-softmax partial of the M query rows of each KV head over cache keys [0, kv_len_B[b]):
    (row max m [B, K, M], normaliser l [B, K, M], unnormalised sum acc [B, K, M, E]); q pre-scaled. A row with
    no key gives (-inf, 0, 0). CPU only (an XLA FFI custom call); `load()` first."""
    B, K, M, E = q_BKME.shape
    f32 = jnp.float32
    out = (jax.ShapeDtypeStruct((B, K, M), f32), jax.ShapeDtypeStruct((B, K, M), f32),
           jax.ShapeDtypeStruct((B, K, M, E), f32))
    return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(
        q_BKME.astype(f32), k_BSKE, v_BSKE, kv_len_B.astype(jnp.int32))

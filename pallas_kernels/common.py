"""Shared pieces of the attention kernels: backend settings, block-size rules, layouts and the
online-softmax step every kernel body uses.

Layout (all three kernels):
- queries are folded per KV head: q [B, T, H, E] -> [B, K, R, E] with R = T * G rows ordered (t, g)
  (G = H / K query heads per KV head), so query row r belongs to token t = r // G. One program
  handles all G heads of a group, so each K/V block is loaded once per KV head group (GQA).
  Causal visibility of key j for row r is `j * G <= r` (no division in the kernel).
- keys/values stay in the model's layout [B, S, K, E], viewed (free reshape) as [B, S, K * E];
  a block (S_blk, E) at block index (b, s, h) is head h's slice. This needs E to be a multiple
  of 128 on TPU (lane tiling) and a power of two on GPU (Triton) — `unsupported_reason` checks.

Masking follows `sparrow_jax.models.attention`: a hidden key contributes exactly 0 probability
(`where`, never a large negative bias alone), so a row with no visible key yields 0, not NaN.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

NEG = -1e30  # finite "minus infinity" for running maxima (no inf - inf NaNs)
TINY = 1e-30
STYLES = ("gpu", "tpu")


@dataclasses.dataclass(frozen=True)
class Backend:
    """How a pallas_call is built. style: which hardware rules the grid/blocks follow ("gpu": Triton,
    "tpu": Mosaic TPU). interpret: run the same kernel body with the Pallas HLO interpreter (CPU)."""

    style: str = "gpu"
    interpret: bool = True
    vmem_limit_bytes: int | None = None  # TPU only: raise the scoped VMEM limit (None: compiler default)

    def __post_init__(self):
        if self.style not in STYLES:
            raise ValueError(f"style {self.style!r}: expected one of {STYLES}")

    @staticmethod
    def detect(platform: str | None = None) -> Backend:
        """tpu -> Mosaic TPU; gpu/cuda/rocm -> Triton; anything else (cpu) -> interpret, GPU rules."""
        platform = platform or jax.default_backend()
        if platform == "tpu":
            return Backend("tpu", False)
        if platform in ("gpu", "cuda", "rocm"):
            return Backend("gpu", False)
        return Backend("gpu", True)

    def compiler_params(self, num_grid_dims: int, *, parallel_dims: int | None = None):
        """Triton: warps/stages; Mosaic TPU: grid dimension semantics (+ VMEM limit). None in
        interpret mode (the interpreter ignores hardware settings)."""
        if self.interpret:
            return None
        if self.style == "gpu":
            from jax.experimental.pallas import triton as pltriton  # noqa: PLC0415

            return pltriton.CompilerParams(num_warps=4, num_stages=2)
        from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415

        n_par = num_grid_dims if parallel_dims is None else parallel_dims
        sem = ("parallel",) * n_par + ("arbitrary",) * (num_grid_dims - n_par)
        return pltpu.CompilerParams(dimension_semantics=sem, vmem_limit_bytes=self.vmem_limit_bytes)


# ------------------------------------------------------------------------------------ block rules


def is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def min_kv_block(style: str) -> int:
    return 128 if style == "tpu" else 16


def min_row_block(style: str) -> int:
    return 8 if style == "tpu" else 16


def check_blocks(style: str, *, rows: int, kv: int, head_dim: int) -> None:
    """Assert the hardware block rules (interpret mode does not check them, so we do):
    Triton needs power-of-two block dims (and >= 16 for tl.dot); TPU needs the last two block dims
    tiled by (8, 128): query-row blocks multiples of 8, key blocks (lanes of the score tile) and
    head_dim (lanes of q/k/v) multiples of 128."""
    assert is_pow2(rows) and is_pow2(kv), f"block sizes must be powers of two (rows {rows}, kv {kv})"
    if style == "tpu":
        assert rows % 8 == 0, f"TPU: query-row block {rows} must be a multiple of 8"
        assert kv % 128 == 0, f"TPU: kv block {kv} must be a multiple of 128"
        assert head_dim % 128 == 0, f"TPU: head_dim {head_dim} must be a multiple of 128"
    else:
        assert rows >= 16 and kv >= 16, f"Triton: blocks must be >= 16 (rows {rows}, kv {kv})"
        assert is_pow2(head_dim) and head_dim >= 16, f"Triton: head_dim {head_dim} must be a power of two >= 16"


def head_dim_reason(style: str, head_dim: int) -> str | None:
    if style == "tpu" and head_dim % 128:
        return f"head_dim {head_dim} is not a multiple of 128 (TPU lane tiling of per-head K/V slices)"
    if style == "gpu" and not (is_pow2(head_dim) and head_dim >= 16):
        return f"head_dim {head_dim} is not a power of two >= 16 (Triton block rule)"
    return None


def padded_head_dim(E: int, style: str) -> int:
    """Head dim the prefill kernel runs at: zero-padding q/k/v's last axis changes no score (and the
    padded output lanes are dropped), so e.g. the Qwen2.5-VL vision tower's head_dim 80 runs as 128."""
    return round_up(E, 128) if style == "tpu" else max(16, next_pow2(E))


def pick_kv_block(S: int, want: int, style: str) -> int:
    """Largest power of two <= want (itself a power of two) that divides S and is >= the backend
    minimum, so the cache needs no padding copy; if none, `want` (the caller pads S)."""
    assert is_pow2(want), f"block_kv {want} must be a power of two"
    b = want
    while b >= min_kv_block(style):
        if S % b == 0:
            return b
        b //= 2
    return want  # below the backend minimum: check_blocks rejects it


def row_block(R: int, want: int, style: str) -> int:
    """Query-row block: a power of two, at least the backend minimum, no larger than needed."""
    return max(min_row_block(style), min(next_pow2(want), next_pow2(R)))


def block_len(N: int, style: str) -> int:
    """Padded length of the extra (tree) key block, loaded whole: lane-tiled on TPU, pow2 on GPU."""
    if style == "tpu":
        return -(-N // 128) * 128
    return max(16, next_pow2(N))


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def pad_axis(x, axis: int, size: int, value=0):
    n = x.shape[axis]
    if n == size:
        return x
    assert n < size, (n, size)
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - n)
    return jnp.pad(x, widths, constant_values=value)


# ---------------------------------------------------------------------------------------- layouts


def fold_queries(q_BTHE, num_kv_heads: int, rows_padded: int):
    """[B, T, H, E] -> [B, K, R_pad, E], rows ordered (t, g)."""
    B, T, H, E = q_BTHE.shape
    G = H // num_kv_heads
    q = q_BTHE.reshape(B, T, num_kv_heads, G, E).transpose(0, 2, 1, 3, 4).reshape(B, num_kv_heads, T * G, E)
    return pad_axis(q, 2, rows_padded)


def unfold_rows(o_BKRE, T: int, H: int):
    """[B, K, R_pad, E] -> [B, T, H, E] (drops padded rows)."""
    B, K, _, E = o_BKRE.shape
    G = H // K
    return o_BKRE[:, :, :T * G].reshape(B, K, T, G, E).transpose(0, 2, 1, 3, 4).reshape(B, T, H, E)


def rows_of_tokens(x_BT, G: int, rows_padded: int, value=0):
    """Per-token data [B, T, ...] -> per-row [B, R_pad, ...] (each token repeated G times)."""
    x = jnp.repeat(x_BT, G, axis=1)
    return pad_axis(x, 1, rows_padded, value)


def kv_view(x_BSKE):
    """[B, S, K, E] -> [B, S, K * E] (free): head h is lane block h of width E."""
    B, S, K, E = x_BSKE.shape
    return x_BSKE.reshape(B, S, K * E)


def lens_operand(kv_len_B, S: int, style: str):
    """Per-row key lengths (clamped to S) as the scalar operand of every kernel: padded to a power
    of two for Triton's block rule; on TPU it goes to SMEM via scalar prefetch."""
    lens = jnp.clip(kv_len_B.astype(jnp.int32), 0, S)
    if style == "gpu":
        lens = pad_axis(lens, 0, next_pow2(lens.shape[0]))
    return lens


def lanes(style: str) -> int:
    """Width of the per-row statistics outputs (log-sum-exp): a full lane tile on TPU."""
    return 128 if style == "tpu" else 1


def call(kernel, *, backend: Backend, grid, in_specs, out_specs, out_shape, lens, operands, name: str,
         parallel_dims: int | None = None):
    """Build and run a pallas_call whose kernel's first ref is the per-row lengths.

    GPU/interpret style: lengths are an ordinary whole-array input. TPU style: they are a scalar
    prefetch operand (SMEM) and index maps also receive them (used to clamp K/V block indices so the
    pipeline does not re-fetch blocks past a row's length). Index maps are written as
    `f(*grid_idx, *scalar_refs)` and must accept both forms."""
    cp = backend.compiler_params(len(grid), parallel_dims=parallel_dims)
    if backend.style == "tpu":
        from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415

        gs = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1, grid=grid, in_specs=in_specs, out_specs=out_specs)
        f = pl.pallas_call(kernel, grid_spec=gs, out_shape=out_shape, interpret=backend.interpret,
                           compiler_params=cp, name=name)
    else:
        specs = [pl.BlockSpec(lens.shape, lambda *idx: (0,))] + list(in_specs)
        f = pl.pallas_call(kernel, grid=grid, in_specs=specs, out_specs=out_specs, out_shape=out_shape,
                           interpret=backend.interpret, compiler_params=cp, name=name)
    return f(lens, *operands)


# ------------------------------------------------------------------------------------ kernel math


def scores(q, k, scale: float):
    """q [R, E] . k [S, E]^T -> fp32 [R, S]."""
    return lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale


def online_step(q, k, v, visible, carry, scale: float):
    """One flash-attention step over a key block. carry = (m [R,1], l [R,1], acc [R,E]) in fp32;
    `visible` [R, S_blk] bool. Hidden keys get probability exactly 0."""
    m_i, l_i, acc = carry
    s = jnp.where(visible, scores(q, k, scale), NEG)
    m_new = jnp.maximum(m_i, jnp.max(s, axis=-1, keepdims=True))
    corr = jnp.exp(m_i - m_new)
    p = jnp.where(visible, jnp.exp(s - m_new), 0.0)
    l_new = l_i * corr + jnp.sum(p, axis=-1, keepdims=True)
    acc = acc * corr + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, l_new, acc


def init_carry(R: int, E: int):
    return (jnp.full((R, 1), NEG, jnp.float32), jnp.zeros((R, 1), jnp.float32), jnp.zeros((R, E), jnp.float32))


def finish(carry):
    """Normalised output and log-sum-exp per row (lse ~ NEG for rows that saw no key)."""
    m_i, l_i, acc = carry
    l_safe = jnp.maximum(l_i, TINY)
    return acc / l_safe, m_i + jnp.log(l_safe)


def cdiv(a, b):
    return (a + b - 1) // b


def scale_for(E: int) -> float:
    return 1.0 / math.sqrt(E)

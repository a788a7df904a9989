"""Tree-verify attention: the target's N tree tokens over its long committed KV cache (32k+) plus
the tree mask over the new block. Split-K (flash-decoding).

Kernel: grid (B, K, row_blocks, splits). The cache is cut into `splits` chunks of `chunk` keys;
program (b, h, r, j) holds the query rows of KV head h's group and runs an online softmax over the
valid blocks of chunk j (none past kv_len[b]: such programs write an empty partial). Split 0 also
folds in the tree block under the tree mask. Each program writes its normalised partial output and
log-sum-exp; a final reduction (plain jnp, O(splits * rows * E)) combines the splits. Every grid
axis is parallel, so a single query row block still fills the machine on long caches. GQA: one
program per KV head group loads each K/V block once. On TPU the chunk index is clamped (scalar
prefetch) to the row's last valid chunk, so the pipeline does not fetch chunks past kv_len.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import common as C
from pallas_kernels.vata import prepare_cache_block


def _verify_kernel(lens_ref, q_ref, k_ref, v_ref, bk_ref, bv_ref, mask_ref, o_ref, lse_ref, *, block_kv: int,
                   scale: float):
    b, j = pl.program_id(0), pl.program_id(3)
    chunk = k_ref.shape[0]
    length = lens_ref[b]
    start0 = j * chunk
    q = q_ref[...]
    R, E = q.shape
    n_blocks = jnp.clip(C.cdiv(length - start0, block_kv), 0, chunk // block_kv)

    def body(i, carry):
        start = pl.multiple_of(i * block_kv, block_kv)
        k = k_ref[pl.ds(start, block_kv), :]
        v = v_ref[pl.ds(start, block_kv), :]
        visible = start0 + start + lax.broadcasted_iota(jnp.int32, (R, block_kv), 1) < length
        return C.online_step(q, k, v, visible, carry, scale)

    carry = lax.fori_loop(0, n_blocks, body, C.init_carry(R, E))
    carry = C.online_step(q, bk_ref[...], bv_ref[...], (mask_ref[...] != 0) & (j == 0), carry, scale)
    o, lse = C.finish(carry)
    o_ref[...] = o
    lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


def pick_chunk(S: int, block_kv: int, want: int) -> int:
    """Largest multiple of block_kv dividing S that is <= want (at least block_kv)."""
    n = S // block_kv
    best = 1
    for d in range(1, n + 1):
        if n % d == 0 and d * block_kv <= max(want, block_kv):
            best = d
    return best * block_kv


def combine_splits(o_BKsRE, lse_BKsR):
    """Flash-decoding reduction: weight each split's normalised output by exp(lse - max lse)."""
    m = jnp.max(lse_BKsR, axis=2, keepdims=True)
    w = jnp.exp(lse_BKsR - m)
    o = jnp.sum(w[..., None] * o_BKsRE, axis=2) / jnp.sum(w, axis=2)[..., None]
    return o


def tree_verify_attention(q_BTHE, k_BSKE, v_BSKE, kv_len_B, block_k_BNKE, block_v_BNKE, block_mask_BTN, *,
                          block_rows: int = 64, block_kv: int = 128, chunk: int = 2048,
                          backend: C.Backend | None = None):
    """Same contract as `vata_attention` (q [B, N, H, E] of the tree tokens, cache valid below
    kv_len_B, tree block under block_mask_BTN); split-K over `chunk`-key pieces of the cache."""
    backend = backend or C.Backend.detect()
    lay, ops = prepare_cache_block(q_BTHE, k_BSKE, v_BSKE, kv_len_B, block_k_BNKE, block_v_BNKE, block_mask_BTN,
                                   block_rows=block_rows, block_kv=block_kv, style=backend.style)
    B, K, E, br, bkv = lay.B, lay.K, lay.E, lay.block_rows, lay.block_kv
    ch = pick_chunk(lay.S, bkv, chunk)
    ns = lay.S // ch
    nl = C.lanes(backend.style)

    def kv_index(b, h, r, j, *refs):
        if refs:  # TPU scalar prefetch: stay on the last valid chunk (no DMA for empty chunks)
            j = jnp.minimum(j, jnp.maximum(C.cdiv(refs[0][b], ch) - 1, 0))
        return (b, j, h)

    grid = (B, K, lay.rows // br, ns)
    in_specs = [
        pl.BlockSpec((None, None, br, E), lambda b, h, r, j, *_: (b, h, r, 0)),
        pl.BlockSpec((None, ch, E), kv_index),
        pl.BlockSpec((None, ch, E), kv_index),
        pl.BlockSpec((None, lay.N, E), lambda b, h, r, j, *_: (b, 0, h)),
        pl.BlockSpec((None, lay.N, E), lambda b, h, r, j, *_: (b, 0, h)),
        pl.BlockSpec((None, br, lay.N), lambda b, h, r, j, *_: (b, r, 0)),
    ]
    out_specs = [
        pl.BlockSpec((None, None, None, br, E), lambda b, h, r, j, *_: (b, h, j, r, 0)),
        pl.BlockSpec((None, None, None, br, nl), lambda b, h, r, j, *_: (b, h, j, r, 0)),
    ]
    out_shape = [jax.ShapeDtypeStruct((B, K, ns, lay.rows, E), jnp.float32),
                 jax.ShapeDtypeStruct((B, K, ns, lay.rows, nl), jnp.float32)]
    kernel = functools.partial(_verify_kernel, block_kv=bkv, scale=C.scale_for(E))
    o_part, lse = C.call(kernel, backend=backend, grid=grid, in_specs=in_specs, out_specs=out_specs,
                         out_shape=out_shape, lens=ops["lens"],
                         operands=[ops[n] for n in ("q", "k", "v", "bk", "bv", "mask")], name="tree_verify_attention")
    o = combine_splits(o_part, lse[..., 0]).astype(q_BTHE.dtype)
    return C.unfold_rows(o, lay.T, lay.H)

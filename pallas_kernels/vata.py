"""VATA draft attention: the draft's queries of one tree-expansion step over its text-only KV cache
plus the in-tree block (fed ancestors + the new nodes), visible through the tree mask.

Kernel: grid (B, K, row_blocks). Program (b, h, r) holds the query rows of KV head h's whole group
([rows, E], G heads x T tokens), walks the row's valid cache blocks with an online softmax
(`fori_loop` up to ceil(kv_len[b] / block_kv), so cost follows the row's text length, not the
capacity), then folds in the tree block under its mask and writes the normalised output. Each K/V
block is loaded once per KV head group. Single pass, no split-K: the draft's text-only cache is
short (up to a few thousand); for long caches use `tree_verify_attention`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import common as C


@dataclasses.dataclass(frozen=True)
class CacheBlockLayout:
    """Static geometry shared by the VATA and tree-verify kernels."""

    B: int
    T: int
    H: int
    K: int
    E: int
    S: int  # padded cache length (multiple of block_kv)
    N: int  # padded tree-block length
    rows: int  # padded query rows (multiple of block_rows)
    block_rows: int
    block_kv: int

    @property
    def G(self):
        return self.H // self.K


def prepare_cache_block(q_BTHE, k_BSKE, v_BSKE, kv_len_B, block_k_BNKE, block_v_BNKE, block_mask_BTN,
                        *, block_rows: int, block_kv: int, style: str):
    """Fold queries into per-KV-head rows, pad to the block rules, view K/V per head (no copy unless
    the cache length is not a multiple of any allowed kv block)."""
    B, T, H, E = q_BTHE.shape
    S, K = k_BSKE.shape[1], k_BSKE.shape[2]
    assert H % K == 0, f"query heads {H} not a multiple of kv heads {K}"
    G = H // K
    bkv = C.pick_kv_block(S, block_kv, style)
    S_pad = C.round_up(S, bkv)
    br = C.row_block(T * G, block_rows, style)
    rows = C.round_up(T * G, br)
    N = block_k_BNKE.shape[1]
    N_pad = C.block_len(N, style)
    C.check_blocks(style, rows=br, kv=bkv, head_dim=E)
    lay = CacheBlockLayout(B, T, H, K, E, S_pad, N_pad, rows, br, bkv)
    ops = dict(
        lens=C.lens_operand(kv_len_B, S, style),
        q=C.fold_queries(q_BTHE, K, rows),
        k=C.kv_view(C.pad_axis(k_BSKE, 1, S_pad)),
        v=C.kv_view(C.pad_axis(v_BSKE, 1, S_pad)),
        bk=C.kv_view(C.pad_axis(block_k_BNKE.astype(k_BSKE.dtype), 1, N_pad)),
        bv=C.kv_view(C.pad_axis(block_v_BNKE.astype(v_BSKE.dtype), 1, N_pad)),
        mask=C.rows_of_tokens(C.pad_axis(block_mask_BTN.astype(jnp.int32), 2, N_pad), G, rows),
    )
    return lay, ops


def _vata_kernel(lens_ref, q_ref, k_ref, v_ref, bk_ref, bv_ref, mask_ref, o_ref, *, block_kv: int, scale: float):
    b = pl.program_id(0)
    length = lens_ref[b]
    q = q_ref[...]
    R, E = q.shape
    n_blocks = jnp.minimum(C.cdiv(length, block_kv), k_ref.shape[0] // block_kv)

    def body(j, carry):
        start = pl.multiple_of(j * block_kv, block_kv)
        k = k_ref[pl.ds(start, block_kv), :]
        v = v_ref[pl.ds(start, block_kv), :]
        visible = start + lax.broadcasted_iota(jnp.int32, (R, block_kv), 1) < length
        return C.online_step(q, k, v, visible, carry, scale)

    carry = lax.fori_loop(0, n_blocks, body, C.init_carry(R, E))
    carry = C.online_step(q, bk_ref[...], bv_ref[...], mask_ref[...] != 0, carry, scale)
    o, _ = C.finish(carry)
    o_ref[...] = o.astype(o_ref.dtype)


def vata_attention(q_BTHE, k_BSKE, v_BSKE, kv_len_B, block_k_BNKE, block_v_BNKE, block_mask_BTN, *,
                   block_rows: int = 64, block_kv: int = 128, backend: C.Backend | None = None):
    """q [B, T, H, E]; cache k/v [B, S, K, E] valid below kv_len_B[b]; block k/v [B, N, K, E] visible
    through block_mask_BTN [B, T, N]. Returns [B, T, H, E] in q's dtype (rows seeing nothing: 0)."""
    backend = backend or C.Backend.detect()
    lay, ops = prepare_cache_block(q_BTHE, k_BSKE, v_BSKE, kv_len_B, block_k_BNKE, block_v_BNKE, block_mask_BTN,
                                   block_rows=block_rows, block_kv=block_kv, style=backend.style)
    B, K, E, br = lay.B, lay.K, lay.E, lay.block_rows
    grid = (B, K, lay.rows // br)
    in_specs = [
        pl.BlockSpec((None, None, br, E), lambda b, h, r, *_: (b, h, r, 0)),
        pl.BlockSpec((None, lay.S, E), lambda b, h, r, *_: (b, 0, h)),
        pl.BlockSpec((None, lay.S, E), lambda b, h, r, *_: (b, 0, h)),
        pl.BlockSpec((None, lay.N, E), lambda b, h, r, *_: (b, 0, h)),
        pl.BlockSpec((None, lay.N, E), lambda b, h, r, *_: (b, 0, h)),
        pl.BlockSpec((None, br, lay.N), lambda b, h, r, *_: (b, r, 0)),
    ]
    out_specs = pl.BlockSpec((None, None, br, E), lambda b, h, r, *_: (b, h, r, 0))
    kernel = functools.partial(_vata_kernel, block_kv=lay.block_kv, scale=C.scale_for(E))
    o = C.call(kernel, backend=backend, grid=grid, in_specs=in_specs, out_specs=out_specs,
               out_shape=jax.ShapeDtypeStruct((B, K, lay.rows, E), q_BTHE.dtype), lens=ops["lens"],
               operands=[ops[n] for n in ("q", "k", "v", "bk", "bv", "mask")], name="vata_attention")
    return C.unfold_rows(o, lay.T, lay.H)

"""Plain-jnp references for the three kernels: dense, obviously correct, independent of the kernels
and of `sparrow_jax.models.attention` (tests also check them against that module's `dense_attention`).

All share one definition: softmax over the visible keys in fp32, hidden keys contribute exactly 0,
a query with no visible key gets 0. KV heads are repeated to the query heads (GQA).
"""

from __future__ import annotations

import math

import jax.numpy as jnp


def masked_attention(q_BTHE, k_BSKE, v_BSKE, visible_BTS):
    """The definition: q [B, T, H, E], k/v [B, S, K, E], visible [B, T, S] -> [B, T, H, E] (fp32 math)."""
    H, K = q_BTHE.shape[2], k_BSKE.shape[2]
    k = jnp.repeat(k_BSKE, H // K, axis=2).astype(jnp.float32)
    v = jnp.repeat(v_BSKE, H // K, axis=2).astype(jnp.float32)
    s = jnp.einsum("bthe,bshe->bhts", q_BTHE.astype(jnp.float32), k) / math.sqrt(q_BTHE.shape[-1])
    vis = visible_BTS[:, None]
    s = jnp.where(vis, s, -jnp.inf)
    mx = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(vis, jnp.exp(s - jnp.where(jnp.isfinite(mx), mx, 0.0)), 0.0)
    p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
    return jnp.einsum("bhts,bshe->bthe", p, v)


def cache_block_visibility(T, S, kv_len_B, block_mask_BTN):
    """[B, T, S + N]: cache keys below each row's length, then the block under its mask."""
    cache = jnp.arange(S)[None, None, :] < kv_len_B[:, None, None]
    cache = jnp.broadcast_to(cache, (kv_len_B.shape[0], T, S))
    return jnp.concatenate([cache, block_mask_BTN.astype(bool)], axis=-1)


def vata_reference(q_BTHE, k_BSKE, v_BSKE, kv_len_B, block_k_BNKE, block_v_BNKE, block_mask_BTN):
    """Draft queries over the text-only cache (valid below kv_len) plus the in-tree block."""
    T, S = q_BTHE.shape[1], k_BSKE.shape[1]
    vis = cache_block_visibility(T, S, kv_len_B, block_mask_BTN)
    k = jnp.concatenate([k_BSKE, block_k_BNKE.astype(k_BSKE.dtype)], axis=1)
    v = jnp.concatenate([v_BSKE, block_v_BNKE.astype(v_BSKE.dtype)], axis=1)
    return masked_attention(q_BTHE, k, v, vis)


# Same contract: the target's tree tokens over its committed cache plus the tree block.
tree_verify_reference = vata_reference


def prefill_visibility(T, S, kv_len_B, causal, q_segment_ids=None, kv_segment_ids=None):
    vis = jnp.arange(S)[None, None, :] < kv_len_B[:, None, None]
    if causal:
        vis = vis & (jnp.arange(S)[None, None, :] <= jnp.arange(T)[None, :, None])
    if q_segment_ids is not None:
        vis = vis & (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])
    return jnp.broadcast_to(vis, (kv_len_B.shape[0], T, S))


def prefill_reference(q_BTHE, k_BSKE, v_BSKE, kv_len_B, *, causal, q_segment_ids=None, kv_segment_ids=None):
    vis = prefill_visibility(q_BTHE.shape[1], k_BSKE.shape[1], kv_len_B, causal, q_segment_ids, kv_segment_ids)
    return masked_attention(q_BTHE, k_BSKE, v_BSKE, vis)

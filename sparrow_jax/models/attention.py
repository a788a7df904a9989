"""The one attention function every model calls.

`attention(q, k, v, mask, block_k=None, block_v=None, impl=...)` covers:
- prefill / training: q, k, v from one sequence, `causal` and per-row key lengths;
- vision segments (frame groups, windows): segments gathered into the batch axis, non-causal,
  per-segment lengths;
- verify / decode: k, v are the committed cache (valid up to `kv_len_B`), plus a new block
  (`block_k`, `block_v`) visible through `block_mask_BTN` (the tree's ancestor mask).

The `xla` implementation is plain jnp: dense scores for small problems, a flash-style blockwise
loop (online softmax, bounded memory) when T*S is large. Pallas kernels plug in behind `impl`.
Masking is done by multiplying probabilities by the mask, so a row with no visible key yields 0
(never NaN) — such rows are padding by construction.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

# Score elements (B*H*T*S) above which the xla path switches to the blockwise loop.
DENSE_SCORE_LIMIT = 1 << 25
Q_BLOCK = 512
KV_BLOCK = 512


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """What a query may see. kv_len_B: main keys j >= kv_len_B[b] are invalid. causal: main key j is
    visible to query i only if j <= i (query i and key i are the same token). block_mask_BTN: which
    keys of the extra block each query sees (only with block_k/block_v)."""

    kv_len_B: jax.Array
    block_mask_BTN: jax.Array | None = None
    causal: bool = dataclasses.field(default=False, metadata=dict(static=True))


def attention(q_BTHE, k_BSKE, v_BSKE, mask: MaskSpec, *, block_k=None, block_v=None, impl: str = "xla"):
    if impl == "pallas":
        from pallas_kernels import dispatch  # noqa: PLC0415 — optional, added by the kernels issue

        return dispatch.attention(q_BTHE, k_BSKE, v_BSKE, mask, block_k=block_k, block_v=block_v)
    if impl != "xla":
        raise ValueError(f"unknown attention impl {impl!r} (expected 'xla' or 'pallas')")
    B, T, H, _ = q_BTHE.shape
    S = k_BSKE.shape[1]
    if block_k is None and B * H * T * S > DENSE_SCORE_LIMIT:
        return blockwise_attention(q_BTHE, k_BSKE, v_BSKE, mask)
    return dense_attention(q_BTHE, k_BSKE, v_BSKE, mask, block_k=block_k, block_v=block_v)


def _group(q_BTHE, num_kv_heads):
    B, T, H, E = q_BTHE.shape
    return q_BTHE.reshape(B, T, num_kv_heads, H // num_kv_heads, E)


def _main_mask(mask: MaskSpec, T: int, S: int, q_start=0, k_start=0):
    """Boolean [B, 1, 1, T, S] visibility for the main keys (positions offset by block starts)."""
    k_idx = k_start + jnp.arange(S)
    valid_BS = k_idx[None, :] < mask.kv_len_B[:, None]
    m = valid_BS[:, None, :]
    if mask.causal:
        q_idx = q_start + jnp.arange(T)
        m = m & (k_idx[None, :] <= q_idx[:, None])[None]
    return m[:, None, None]


def _masked_softmax(s, m):
    s = jnp.where(m, s, -jnp.inf)
    mx = jnp.max(s, axis=-1, keepdims=True)
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    p = jnp.exp(s - mx) * m
    return p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)


def dense_attention(q_BTHE, k_BSKE, v_BSKE, mask: MaskSpec, *, block_k=None, block_v=None):
    """Reference path: full score matrix (fp32), softmax, weighted sum. GQA by head grouping."""
    B, T, H, E = q_BTHE.shape
    S, K = k_BSKE.shape[1], k_BSKE.shape[2]
    scale = 1.0 / math.sqrt(E)
    q_BTKGE = _group(q_BTHE, K)
    s_BKGTS = jnp.einsum("btkge,bske->bkgts", q_BTKGE, k_BSKE, preferred_element_type=jnp.float32) * scale
    m = jnp.broadcast_to(_main_mask(mask, T, S), s_BKGTS.shape)
    if block_k is not None:
        s_blk = jnp.einsum("btkge,bnke->bkgtn", q_BTKGE, block_k, preferred_element_type=jnp.float32) * scale
        bm = jnp.broadcast_to(mask.block_mask_BTN[:, None, None], s_blk.shape)
        p = _masked_softmax(jnp.concatenate([s_BKGTS, s_blk], -1), jnp.concatenate([m, bm], -1))
        p_main, p_blk = p[..., :S], p[..., S:]
        o = jnp.einsum("bkgts,bske->btkge", p_main.astype(v_BSKE.dtype), v_BSKE)
        o = o + jnp.einsum("bkgtn,bnke->btkge", p_blk.astype(block_v.dtype), block_v)
    else:
        p = _masked_softmax(s_BKGTS, m)
        o = jnp.einsum("bkgts,bske->btkge", p.astype(v_BSKE.dtype), v_BSKE)
    return o.reshape(B, T, H, E).astype(q_BTHE.dtype)


def _pad_axis(x, axis, multiple):
    n = x.shape[axis]
    pad = (-n) % multiple
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def blockwise_attention(q_BTHE, k_BSKE, v_BSKE, mask: MaskSpec, *, q_block: int = Q_BLOCK,
                        kv_block: int = KV_BLOCK):
    """Flash-style attention: query blocks in sequence (lax.map), an online-softmax loop over key
    blocks that stops at the last block any query of the block can see (causal / key length).
    Memory O(B*H*q_block*kv_block). Inference path: the dynamic loop bound is not reverse-differentiable
    (training uses the dense path or the Pallas kernel's custom VJP)."""
    B, T, H, E = q_BTHE.shape
    S, K = k_BSKE.shape[1], k_BSKE.shape[2]
    G = H // K
    q_block, kv_block = min(q_block, T), min(kv_block, S)
    scale = 1.0 / math.sqrt(E)
    q = _pad_axis(_group(q_BTHE, K), 1, q_block)
    k = _pad_axis(k_BSKE, 1, kv_block)
    v = _pad_axis(v_BSKE, 1, kv_block)
    nq, nk = q.shape[1] // q_block, k.shape[1] // kv_block
    q_nBqKGE = q.reshape(B, nq, q_block, K, G, E).swapaxes(0, 1)
    k_BnkKE = k.reshape(B, nk, kv_block, K, E)
    v_BnkKE = v.reshape(B, nk, kv_block, K, E)
    max_len = jnp.max(mask.kv_len_B)
    len_blocks = (max_len + kv_block - 1) // kv_block

    def one_q_block(args):
        qi, q_BqKGE = args
        n_needed = jnp.minimum(len_blocks, nk)
        if mask.causal:
            n_needed = jnp.minimum(n_needed, ((qi + 1) * q_block + kv_block - 1) // kv_block)

        def body(ki, carry):
            m_i, l_i, acc = carry
            k_blk = jax.lax.dynamic_index_in_dim(k_BnkKE, ki, axis=1, keepdims=False)
            v_blk = jax.lax.dynamic_index_in_dim(v_BnkKE, ki, axis=1, keepdims=False)
            s = jnp.einsum("bqkge,bske->bkgqs", q_BqKGE, k_blk, preferred_element_type=jnp.float32) * scale
            vis = _main_mask(mask, q_block, kv_block, q_start=qi * q_block, k_start=ki * kv_block)
            s = jnp.where(vis, s, -jnp.inf)
            m_new = jnp.maximum(m_i, jnp.max(s, axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - m_safe[..., None]) * vis
            corr = jnp.exp(jnp.where(jnp.isfinite(m_i), m_i, 0.0) - m_safe) * jnp.isfinite(m_i)
            l_new = l_i * corr + jnp.sum(p, axis=-1)
            acc = acc * corr[..., None] + jnp.einsum("bkgqs,bske->bkgqe", p.astype(v_blk.dtype), v_blk,
                                                     preferred_element_type=jnp.float32)
            return m_new, l_new, acc

        init = (jnp.full((B, K, G, q_block), -jnp.inf, jnp.float32), jnp.zeros((B, K, G, q_block), jnp.float32),
                jnp.zeros((B, K, G, q_block, E), jnp.float32))
        _, l_f, acc = jax.lax.fori_loop(0, n_needed, body, init)
        o = acc / jnp.maximum(l_f, 1e-30)[..., None]
        return jnp.moveaxis(o, 3, 1)  # [B, q, K, G, E]

    o_nBqKGE = jax.lax.map(one_q_block, (jnp.arange(nq), q_nBqKGE))
    o = o_nBqKGE.swapaxes(0, 1).reshape(B, nq * q_block, H, E)[:, :T]
    return o.astype(q_BTHE.dtype)

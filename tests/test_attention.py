"""The one attention function: blockwise == dense, masks are what they claim (gradient tests)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparrow_jax.models import attention as attn_lib
from sparrow_jax.models.attention import MaskSpec, blockwise_attention, cached_attention, dense_attention


def _qkv(seed, B, T, S, H, K, E):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (B, T, H, E)), jax.random.normal(ks[1], (B, S, K, E)),
            jax.random.normal(ks[2], (B, S, K, E)))


def _naive(q, k, v, visible_BTS):
    """Loop-free but independent reference: repeat kv heads, softmax over visible keys."""
    H, K = q.shape[2], k.shape[2]
    k = jnp.repeat(k, H // K, axis=2)
    v = jnp.repeat(v, H // K, axis=2)
    s = jnp.einsum("bthe,bshe->bhts", q, k) / np.sqrt(q.shape[-1])
    s = jnp.where(visible_BTS[:, None], s, -1e30)
    p = jax.nn.softmax(s, -1) * visible_BTS[:, None]
    return jnp.einsum("bhts,bshe->bthe", p, v)


@pytest.mark.parametrize("B,T,H,K,E,causal,qb,kb", [
    (2, 70, 4, 2, 8, True, 16, 32),   # lengths not block multiples, GQA 2
    (1, 33, 6, 1, 16, True, 8, 8),    # MQA
    (3, 50, 2, 2, 8, False, 32, 16),  # bidirectional (vision segments), per-row lengths
])
def test_blockwise_matches_dense_and_reference(B, T, H, K, E, causal, qb, kb):
    q, k, v = _qkv(0, B, T, T, H, K, E)
    lens = jnp.asarray([T, T - 7, 1][:B], jnp.int32)
    mask = MaskSpec(kv_len_B=lens, causal=causal)
    dense = dense_attention(q, k, v, mask)
    block = blockwise_attention(q, k, v, mask, q_block=qb, kv_block=kb)
    vis = jnp.arange(T)[None, None, :] < lens[:, None, None]
    if causal:
        vis = vis & (jnp.arange(T)[None, :, None] >= jnp.arange(T)[None, None, :])
    ref = _naive(q, k, v, vis)
    valid_q = np.asarray(jnp.arange(T)[None] < lens[:, None])  # rows past a length are padding
    for out in (dense, block):
        np.testing.assert_allclose(np.asarray(out)[valid_q], np.asarray(ref)[valid_q], atol=1e-5)
    np.testing.assert_allclose(np.asarray(block), np.asarray(dense), atol=1e-5)


def test_causal_mask_gradient_is_zero_for_future_keys():
    q, k, v = _qkv(1, 1, 24, 24, 4, 2, 8)
    mask = MaskSpec(kv_len_B=jnp.asarray([24]), causal=True)
    i = 10
    g_k, g_v = jax.grad(lambda k, v: dense_attention(q, k, v, mask)[0, i].sum(), argnums=(0, 1))(k, v)
    assert np.all(np.asarray(g_k)[0, i + 1:] == 0) and np.all(np.asarray(g_v)[0, i + 1:] == 0)
    assert np.abs(np.asarray(g_v)[0, : i + 1]).sum() > 0
    # The blockwise forward by perturbation (its custom-VJP gradient: test_attention_grad.py).
    blk = lambda k, v: blockwise_attention(q, k, v, mask, q_block=8, kv_block=8)  # noqa: E731
    base = np.asarray(blk(k, v))
    pert = np.asarray(blk(k.at[0, i + 1:].add(5.0), v.at[0, i + 1:].add(5.0)))
    np.testing.assert_array_equal(pert[0, : i + 1], base[0, : i + 1])
    assert np.abs(pert[0, i + 1:] - base[0, i + 1:]).max() > 1e-3


def test_key_length_mask_hides_padding():
    q, k, v = _qkv(2, 2, 8, 16, 2, 2, 4)
    mask = MaskSpec(kv_len_B=jnp.asarray([5, 16]))
    out = dense_attention(q, k, v, mask)
    k2 = k.at[0, 5:].set(99.0)
    v2 = v.at[0, 5:].set(-99.0)
    np.testing.assert_array_equal(np.asarray(dense_attention(q, k2, v2, mask))[0], np.asarray(out)[0])


def test_cache_plus_block_tree_mask():
    """Cache keys up to each row's length plus a block under a tree mask == naive attention over
    the concatenation with the combined mask; a single-visible-key row is exact."""
    B, N, S, H, K, E = 2, 5, 12, 4, 2, 8
    q, ck, cv = _qkv(3, B, N, S, H, K, E)
    _, bk, bv = _qkv(4, B, N, N, H, K, E)
    lens = jnp.asarray([7, 12])
    parent = [-1, 0, 0, 1, 2]
    anc = np.eye(N, dtype=bool)
    for i in range(N):
        p = parent[i]
        while p >= 0:
            anc[i, p] = True
            p = parent[p]
    tree = jnp.broadcast_to(jnp.asarray(anc), (B, N, N))
    out = dense_attention(q, ck, cv, MaskSpec(kv_len_B=lens, block_mask_BTN=tree), block_k=bk, block_v=bv)
    vis = jnp.concatenate([jnp.broadcast_to((jnp.arange(S)[None] < lens[:, None])[:, None], (B, N, S)), tree], -1)
    ref = _naive(q, jnp.concatenate([ck, bk], 1), jnp.concatenate([cv, bv], 1), vis)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
    # Single visible key: zero-length cache row, root node sees only itself -> output = its value.
    lone = dense_attention(q, ck, cv, MaskSpec(kv_len_B=jnp.asarray([0, 0]), block_mask_BTN=tree), block_k=bk, block_v=bv)
    np.testing.assert_allclose(np.asarray(lone)[:, 0], np.repeat(np.asarray(bv)[:, 0], H // K, axis=1), atol=1e-6)


@pytest.mark.parametrize("B,N,S,H,K,E,kb,lens", [
    (2, 5, 37, 4, 2, 8, 8, [7, 37]),    # several chunks, S not a chunk multiple (clamped last chunk), GQA 2
    (3, 1, 20, 6, 1, 16, 16, [0, 1, 17]),  # AR step (one node), MQA, an empty row
    (1, 9, 64, 2, 2, 8, 128, [40]),     # one chunk wider than the cache
    (2, 1, 45, 4, 2, 8, 16, [45, 3]),   # AR step, GQA 2: the block-diagonal GEMM form (K*G*T <= 32)
    (2, 2, 33, 2, 2, 16, 8, [9, 33]),   # a 2-node chain, MHA: GEMM form
    (2, 3, 150, 4, 2, 8, 8, [150, 70]),  # runs of 4 chunks (4 x 32), then 3 chunks (the last slid back)
    (2, 1, 100, 4, 2, 8, 8, [100, 33]),  # the same in the GEMM form (whole cache read: 100 >= 2/3 of it)
    (2, 1, 100, 4, 2, 8, 8, [50, 3]),   # GEMM form below 2/3 of the capacity: the chunk loop
    (1, 2, 20, 2, 1, 8, 8, [20]),       # a run of chunks capped at the capacity (one read of all 20 keys)
])
def test_cached_attention_equals_dense(B, N, S, H, K, E, kb, lens):
    """The verify / decode path (chunks up to the longest committed length, online softmax) equals
    the dense reference for tree masks, per-row lengths and chunk edges; it is what `attention` runs
    for a cache + block on the xla path. Keys past each row's length never matter (overwritten here)."""
    q, ck, cv = _qkv(5, B, N, S, H, K, E)
    _, bk, bv = _qkv(6, B, N, N, H, K, E)
    lens = jnp.asarray(lens)
    tree = jax.random.bernoulli(jax.random.key(7), 0.5, (B, N, N)) | jnp.eye(N, dtype=bool)[None]
    mask = MaskSpec(kv_len_B=lens, block_mask_BTN=tree)
    ref = dense_attention(q, ck, cv, mask, block_k=bk, block_v=bv)
    stale = jnp.arange(S)[None, :, None, None] >= lens[:, None, None, None]
    ck, cv = jnp.where(stale, 1e4, ck), jnp.where(stale, -1e4, cv)
    out = jax.jit(lambda q, k, v, m, bk, bv: cached_attention(q, k, v, m, block_k=bk, block_v=bv, kv_block=kb))(
        q, ck, cv, mask, bk, bv)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-6, rtol=1e-5)
    xla_only = dict(cache_block=kb, cpu_kernel_rows=0)  # XLA's own cache reads (no compiled CPU kernel)
    for impl in (attn_lib.XLA, attn_lib.AttentionImpl(cache_block=kb), attn_lib.AttentionImpl(cache_block=0),
                 attn_lib.AttentionImpl(**xla_only),
                 attn_lib.AttentionImpl(**xla_only, gemm_columns=0),  # transposed chunks at every size
                 attn_lib.AttentionImpl(**xla_only, gemm_columns=1 << 20),  # GEMMs at every size
                 attn_lib.AttentionImpl(**xla_only, gemm_columns=1 << 20, whole_cache_fill=0),  # whole cache
                 attn_lib.AttentionImpl(**xla_only, gemm_columns=1 << 20, whole_cache_fill=2),  # chunks
                 attn_lib.AttentionImpl(cache_block=kb, cpu_kernel_rows=64)):  # the CPU kernel at every size
        routed = attn_lib.attention(q, ck, cv, mask, block_k=bk, block_v=bv, impl=impl)
        np.testing.assert_allclose(np.asarray(routed), np.asarray(ref), atol=2e-6, rtol=1e-5)


def test_cache_block_is_validated():
    for bad in (-1, 1.5, None):
        with pytest.raises(ValueError, match="cache_block"):
            attn_lib.AttentionImpl(cache_block=bad)
        with pytest.raises(ValueError, match="gemm_columns"):
            attn_lib.AttentionImpl(gemm_columns=bad)
    for bad in (-0.5, None, "all"):
        with pytest.raises(ValueError, match="whole_cache_fill"):
            attn_lib.AttentionImpl(whole_cache_fill=bad)
    for bad in (-1, 65, 2.0, None):
        with pytest.raises(ValueError, match="cpu_kernel_rows"):
            attn_lib.AttentionImpl(cpu_kernel_rows=bad)

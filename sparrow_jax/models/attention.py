"""The one attention function every model calls.

`attention(q, k, v, mask, block_k=None, block_v=None, impl=AttentionImpl(...))` covers:
- prefill / training: q, k, v from one sequence, `causal` and per-row key lengths;
- vision segments (frame groups, windows): segments gathered into the batch axis, non-causal,
  per-segment lengths;
- verify / decode: k, v are the committed cache (valid up to `kv_len_B`), plus a new block
  (`block_k`, `block_v`) visible through `block_mask_BTN` (the tree's ancestor mask).

The `xla` implementation is plain jnp: dense scores for small problems, a flash-style blockwise
loop (online softmax, bounded memory) when T*S is large; both are reverse-differentiable (the blockwise
one through a FlashAttention-2 custom VJP), so training runs at video lengths. The Pallas kernels
(`pallas_kernels`) plug in behind `impl`: an `AttentionImpl` value (kind + block sizes), hashable, passed
explicitly from the CLI / config down to every call (a static jit argument of the jitted entry points).
Masking is done by multiplying probabilities by the mask, so a row with no visible key yields 0
(never NaN) — such rows are padding by construction.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

import cpu_kernels
from pallas_kernels import dispatch

# Score elements (B*H*T*S) above which the xla path switches to the blockwise loop. Measured on XLA:CPU: blockwise
# wins from ~700 tokens with 4 heads (LM prefill at 1.6k tokens: dense 0.39 s, blockwise 0.22 s; target train step
# at 512 visual tokens, batch 8: 5.3 -> 4.5 s); dense stays faster only on small problems (400 tokens: 2.1 vs 2.9 ms).
DENSE_SCORE_LIMIT = 1 << 21
# Blockwise (prefill / training) block sizes, measured on XLA:CPU (BENCHMARKS "Prefill at long video"): with the
# per-KV-head layout 256 x 512 was the fastest at 1.6k and 4k tokens (LM prefill 0.21 / 0.77 s) and 11 % behind
# 512 x 512 at 16k (7.75 vs 6.86 s, one run each); 128 x 1024, the old default, was behind at every length.
Q_BLOCK = 256
KV_BLOCK = 512
DECODE_KV_BLOCK = 1024  # cache keys per chunk of `cached_attention` (a chunk's K/V, transposed, stays in L2)
BIG_CHUNKS = 4  # `cached_attention` reads whole runs of 4 chunks at once first (fewer loop trips on long caches)
# cached_attention: K*G*T query columns up to which the cache is read by plain GEMMs (K x the FLOPs of per-head
# products; with the whole-cache read faster than transposed chunks up to 32 columns, chains up to 8 nodes here:
# BENCHMARKS, roofline); wider trees are compute-bound and read transposed chunks
GEMM_MAX_COLUMNS = 32
# The GEMM form reads the whole capacity in one pass once the longest row fills this much of it: a chunk loop
# copies each chunk out of the cache before its GEMMs (XLA:CPU cannot fuse a dynamic slice into a dot), ~1.5x the
# cost per key of GEMMs straight on the cache buffer (BENCHMARKS, roofline: whole-cache reads)
WHOLE_CACHE_FILL = 2 / 3
# cached_attention on the CPU backend: query rows per KV head (G*T) up to which the cache is read by the compiled
# kernel of `cpu_kernels` (one streaming pass over K/V, both cores) instead of XLA's GEMMs. Measured faster up to
# 16 rows (BENCHMARKS, the CPU decode kernel: the tiny target's AR step and chains of 2, 4 and 8 nodes, a 7B-shaped
# GQA group's AR step and 2-node chain); wider trees (the 48-node tree: 96 rows) keep XLA's GEMMs
CPU_KERNEL_MAX_ROWS = 16


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """What a query may see. kv_len_B: main keys j >= kv_len_B[b] are invalid. causal: main key j is
    visible to query i only if j <= i (query i and key i are the same token). block_mask_BTN: which
    keys of the extra block each query sees (only with block_k/block_v). key_visible_BS: main keys
    with False are invisible to every query (the internalization study's visual-KV removal, see
    `target.visual_key_visibility`; dense xla path only, never set in decoding or training)."""

    kv_len_B: jax.Array
    block_mask_BTN: jax.Array | None = None
    causal: bool = dataclasses.field(default=False, metadata=dict(static=True))
    key_visible_BS: jax.Array | None = None


IMPL_KINDS = ("xla", "pallas")


@dataclasses.dataclass(frozen=True)
class AttentionImpl:
    """Which attention implementation the models run (hashable: a static jit argument).

    kind "xla": plain jnp (dense, blockwise past `DENSE_SCORE_LIMIT`; verify / decode over a cache in
    chunks of `cache_block` keys, `cached_attention`, or dense over the whole capacity with 0: the
    reference; blocks of at most `gemm_columns` query columns (K*G*T) by plain GEMMs on the cache's own
    layout, larger ones on transposed chunks; the GEMMs read the whole capacity in one pass, without the
    chunk loop, once the longest row fills `whole_cache_fill` of it — above 1: never; on the CPU backend, blocks of at
    most `cpu_kernel_rows` query rows per KV head (G*T) read the cache with the compiled kernel of `cpu_kernels`
    instead, when it builds — 0: never). kind "pallas": the
    kernels of `pallas_kernels`, routed per call by shape (`dispatch.route`), with `blocks`' block sizes
    (None: the backend's defaults, `dispatch.default_config()`, resolved at trace time); a call they cannot
    take runs the xla path."""

    kind: str = "xla"
    blocks: dispatch.DispatchConfig | None = None
    cache_block: int = DECODE_KV_BLOCK
    gemm_columns: int = GEMM_MAX_COLUMNS
    whole_cache_fill: float = WHOLE_CACHE_FILL
    cpu_kernel_rows: int = CPU_KERNEL_MAX_ROWS

    def __post_init__(self):
        if self.kind not in IMPL_KINDS:
            raise ValueError(f"attention impl kind {self.kind!r}: expected one of {IMPL_KINDS}")
        if self.blocks is not None and self.kind != "pallas":
            raise ValueError(f"attention impl {self.kind!r}: block sizes are for kind 'pallas' only")
        if self.blocks is not None and not isinstance(self.blocks, dispatch.DispatchConfig):
            raise TypeError(f"attention impl blocks {self.blocks!r}: expected a dispatch.DispatchConfig")
        if not isinstance(self.cache_block, int) or self.cache_block < 0:
            raise ValueError(f"attention impl cache_block {self.cache_block!r}: expected an int >= 0 "
                             "(keys per chunk of a cache read; 0 = dense over the whole capacity)")
        if not isinstance(self.gemm_columns, int) or self.gemm_columns < 0:
            raise ValueError(f"attention impl gemm_columns {self.gemm_columns!r}: expected an int >= 0 (query "
                             "columns K*G*T up to which a cache read runs as plain GEMMs; 0 = never)")
        if not isinstance(self.whole_cache_fill, (int, float)) or not self.whole_cache_fill >= 0:
            raise ValueError(f"attention impl whole_cache_fill {self.whole_cache_fill!r}: expected a number >= 0 "
                             "(fill of the capacity from which a GEMM-form cache read takes it whole; > 1 = never)")
        if not isinstance(self.cpu_kernel_rows, int) or not 0 <= self.cpu_kernel_rows <= cpu_kernels.MAX_ROWS:
            raise ValueError(f"attention impl cpu_kernel_rows {self.cpu_kernel_rows!r}: expected an int in "
                             f"[0, {cpu_kernels.MAX_ROWS}] (query rows per KV head up to which a cache read on the "
                             "CPU runs the compiled kernel; 0 = never)")

    @classmethod
    def of(cls, value: AttentionImpl | str) -> AttentionImpl:
        """The CLI / config boundary: "xla" / "pallas" (or an AttentionImpl, returned as is)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls(value)
        raise TypeError(f"attention impl {value!r}: expected 'xla', 'pallas' or an AttentionImpl")

    @classmethod
    def pallas(cls, **blocks) -> AttentionImpl:
        """kind "pallas" with some block sizes changed from the backend's defaults (e.g. split_min_len=160)."""
        return cls("pallas", dispatch.default_config(**blocks) if blocks else None)


XLA = AttentionImpl()


def attention(q_BTHE, k_BSKE, v_BSKE, mask: MaskSpec, *, block_k=None, block_v=None, impl: AttentionImpl = XLA):
    if not isinstance(impl, AttentionImpl):
        raise TypeError(f"attention: impl {impl!r} must be an AttentionImpl (convert a string once with "
                        "AttentionImpl.of)")
    if mask.key_visible_BS is not None:  # analysis option: the reference path only
        if impl.kind != "xla":
            raise ValueError(f"MaskSpec.key_visible_BS is supported by impl 'xla' only, not {impl.kind!r}")
        return dense_attention(q_BTHE, k_BSKE, v_BSKE, mask, block_k=block_k, block_v=block_v)
    if impl.kind == "pallas":
        cfg = impl.blocks or dispatch.default_config()
        name, reason = dispatch.route(q_BTHE, k_BSKE, v_BSKE, mask, block_k=block_k, block_v=block_v, config=cfg)
        if name != "xla":
            return dispatch.run_kernel(name, q_BTHE, k_BSKE, v_BSKE, mask, block_k=block_k, block_v=block_v,
                                       config=cfg)
        dispatch.log_fallback(reason)
        return _xla_fallback(q_BTHE, k_BSKE, v_BSKE, mask, block_k, block_v, cache_block=impl.cache_block,
                             gemm_columns=impl.gemm_columns, whole_cache_fill=impl.whole_cache_fill,
                             cpu_kernel_rows=impl.cpu_kernel_rows)
    return _xla_attention(q_BTHE, k_BSKE, v_BSKE, mask, block_k=block_k, block_v=block_v, cache_block=impl.cache_block,
                          gemm_columns=impl.gemm_columns, whole_cache_fill=impl.whole_cache_fill,
                          cpu_kernel_rows=impl.cpu_kernel_rows)


def _xla_attention(q_BTHE, k_BSKE, v_BSKE, mask: MaskSpec, *, block_k=None, block_v=None,
                   cache_block: int = DECODE_KV_BLOCK, gemm_columns: int = GEMM_MAX_COLUMNS,
                   whole_cache_fill: float = WHOLE_CACHE_FILL, cpu_kernel_rows: int = CPU_KERNEL_MAX_ROWS):
    B, T, H, _ = q_BTHE.shape
    S = k_BSKE.shape[1]
    if block_k is not None:  # verify / decode over a cache
        if cache_block == 0 or mask.causal:
            return dense_attention(q_BTHE, k_BSKE, v_BSKE, mask, block_k=block_k, block_v=block_v)
        return cached_attention(q_BTHE, k_BSKE, v_BSKE, mask, block_k=block_k, block_v=block_v, kv_block=cache_block,
                                gemm_columns=gemm_columns, whole_cache_fill=whole_cache_fill,
                                cpu_kernel_rows=cpu_kernel_rows)
    if B * H * T * S > DENSE_SCORE_LIMIT:
        return blockwise_attention(q_BTHE, k_BSKE, v_BSKE, mask)
    return dense_attention(q_BTHE, k_BSKE, v_BSKE, mask)


@dispatch.routed("xla", static_argnames=("cache_block", "gemm_columns", "whole_cache_fill", "cpu_kernel_rows"))
def _xla_fallback(q_BTHE, k_BSKE, v_BSKE, mask: MaskSpec, block_k, block_v, *, cache_block: int, gemm_columns: int,
                  whole_cache_fill: float, cpu_kernel_rows: int):
    """The XLA path for a call the kernels cannot take (named, so `dispatch.routes_in` sees it)."""
    return _xla_attention(q_BTHE, k_BSKE, v_BSKE, mask, block_k=block_k, block_v=block_v, cache_block=cache_block,
                          gemm_columns=gemm_columns, whole_cache_fill=whole_cache_fill,
                          cpu_kernel_rows=cpu_kernel_rows)


def _group(q_BTHE, num_kv_heads):
    B, T, H, E = q_BTHE.shape
    return q_BTHE.reshape(B, T, num_kv_heads, H // num_kv_heads, E)


def _main_mask(mask: MaskSpec, T: int, S: int, q_start=0, k_start=0):
    """Boolean [B, 1, 1, T, S] visibility for the main keys (positions offset by block starts)."""
    k_idx = k_start + jnp.arange(S)
    valid_BS = k_idx[None, :] < mask.kv_len_B[:, None]
    if mask.key_visible_BS is not None:
        valid_BS = valid_BS & mask.key_visible_BS
    m = valid_BS[:, None, :]
    if mask.causal:
        q_idx = q_start + jnp.arange(T)
        m = m & (k_idx[None, :] <= q_idx[:, None])[None]
    return m[:, None, None]


def _masked_softmax(s, m):
    """Softmax over the visible scores; a row with none gives zeros. Hidden scores are -inf, so exp gives
    exactly 0 there without multiplying by the mask (which XLA:CPU materialised as a float array of the
    scores' size: ~9 ms per vision-tower call at 6k patches)."""
    s = jnp.where(m, s, -jnp.inf)
    mx = jnp.max(s, axis=-1, keepdims=True)
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    p = jnp.exp(s - mx)
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


def cached_attention(q_BTHE, k_BSKE, v_BSKE, mask: MaskSpec, *, block_k, block_v, kv_block: int = DECODE_KV_BLOCK,
                     gemm_columns: int = GEMM_MAX_COLUMNS, whole_cache_fill: float = WHOLE_CACHE_FILL,
                     cpu_kernel_rows: int = CPU_KERNEL_MAX_ROWS):
    """Verify / decode (xla): the committed cache read in chunks (runs of BIG_CHUNKS * `kv_block` keys, then
    `kv_block`: `_over_cache_chunks`), only up to the longest row's committed length (a dynamic trip count: the
    cost follows the committed length, not the capacity bucket), with an online softmax; then the new block
    under its mask. Equals `dense_attention` up to fp32 rounding. Queries are grouped per KV head as [B, K, G*T, E] once and
    each chunk is transposed to [B, K, kv_block, E] (cache-resident), so both products are batched
    GEMMs with the batch dims leading: einsums over the [B, S, K, E] cache with K in the middle make
    XLA:CPU transpose the whole cache, or run its slow dot path (roofline section of BENCHMARKS).
    On the CPU backend, blocks of at most `cpu_kernel_rows` rows per KV head read the cache with the compiled
    kernel of `cpu_kernels` instead (each row's own length, one pass, both cores)."""
    if mask.key_visible_BS is not None or mask.causal:
        raise ValueError("cached_attention covers kv_len_B + block_mask_BTN only (use dense_attention)")
    B, T, H, E = q_BTHE.shape
    S, K = k_BSKE.shape[1], k_BSKE.shape[2]
    G = H // K
    if G * T <= cpu_kernel_rows and cpu_kernels.supports(q_BTHE, k_BSKE, G * T):
        xla_read = functools.partial(cached_attention, q_BTHE, k_BSKE, v_BSKE, mask, block_k=block_k, block_v=block_v,
                                     kv_block=kv_block, gemm_columns=gemm_columns, whole_cache_fill=whole_cache_fill,
                                     cpu_kernel_rows=0)
        kernel_read = functools.partial(_cached_attention_cpu_kernel, q_BTHE, k_BSKE, v_BSKE, mask, block_k=block_k,
                                        block_v=block_v)
        return jax.lax.platform_dependent(cpu=kernel_read, default=xla_read)  # lowered for GPU/TPU: XLA's read
    if K * G * T <= gemm_columns:
        return _cached_attention_gemm(q_BTHE, k_BSKE, v_BSKE, mask, block_k=block_k, block_v=block_v,
                                      kv_block=kv_block, whole_cache_fill=whole_cache_fill)
    q_BKME = _queries_per_kv_head(q_BTHE, K)
    kv_len_B = jnp.clip(mask.kv_len_B.astype(jnp.int32), 0, S)

    def chunk(k_BsKE, v_BsKE, vis_Bs, carry):
        return _online_per_kv_head(q_BKME, carry, _heads_first(k_BsKE), _heads_first(v_BsKE),
                                   vis_Bs[:, None, None, :])

    init = (jnp.full((B, K, G * T), -jnp.inf, jnp.float32), jnp.zeros((B, K, G * T), jnp.float32),
            jnp.zeros((B, K, G * T, E), jnp.float32))
    carry = _over_cache_chunks(k_BSKE, v_BSKE, kv_len_B, kv_block, chunk, init)
    return _finish_per_kv_head(q_BKME, carry, q_BTHE, mask, block_k, block_v)


def _queries_per_kv_head(q_BTHE, K: int):
    """[B, T, H, E] -> [B, K, G*T, E] (row m = g * T + t), pre-scaled by 1/sqrt(E)."""
    B, T, H, E = q_BTHE.shape
    return (_group(q_BTHE, K).transpose(0, 2, 3, 1, 4).reshape(B, K, (H // K) * T, E)
            * jnp.asarray(1.0 / math.sqrt(E), q_BTHE.dtype))


def _heads_first(x_BSKE):
    return x_BSKE.transpose(0, 2, 1, 3)  # [B, S, K, E] -> [B, K, S, E]


def _online_update(carry, s, weighted_sum):
    """One online-softmax step: running (max, normaliser, unnormalised sum) updated with scores `s` (hidden ones
    -inf, keys on the last axis) and `weighted_sum(p)`, the probabilities' product with the values."""
    m_i, l_i, acc = carry
    m_new = jnp.maximum(m_i, jnp.max(s, axis=-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(s - m_safe[..., None])  # hidden scores are -inf: 0
    corr = jnp.exp(jnp.where(jnp.isfinite(m_i), m_i, 0.0) - m_safe) * jnp.isfinite(m_i)
    return m_new, l_i * corr + jnp.sum(p, axis=-1), acc * corr[..., None] + weighted_sum(p)


def _online_per_kv_head(q_BKME, carry, k_BKSE, v_BKSE, vis_BKMS):
    """One online-softmax step of the per-KV-head rows over keys k/v (hidden where vis is False)."""
    s_BKMS = jnp.einsum("bkme,bkse->bkms", q_BKME, k_BKSE, preferred_element_type=jnp.float32)
    return _online_update(carry, jnp.where(vis_BKMS, s_BKMS, -jnp.inf), lambda p: jnp.einsum(
        "bkms,bkse->bkme", p.astype(v_BKSE.dtype), v_BKSE, preferred_element_type=jnp.float32))


def _finish_per_kv_head(q_BKME, carry, q_BTHE, mask: MaskSpec, block_k, block_v):
    """The new block's keys under its mask on top of the cache's partial `carry`, normalised, as [B, T, H, E]."""
    B, T, H, E = q_BTHE.shape
    K = q_BKME.shape[1]
    G = H // K
    vis_blk = jnp.tile(mask.block_mask_BTN.astype(bool), (1, G, 1))[:, None]  # [B, 1, G*T, N]
    _, l_f, acc = _online_per_kv_head(q_BKME, carry, _heads_first(block_k), _heads_first(block_v), vis_blk)
    o_BKME = acc / jnp.maximum(l_f, 1e-30)[..., None]
    return o_BKME.reshape(B, K, G, T, E).transpose(0, 3, 1, 2, 4).reshape(B, T, H, E).astype(q_BTHE.dtype)


def _cached_attention_cpu_kernel(q_BTHE, k_BSKE, v_BSKE, mask: MaskSpec, *, block_k, block_v):
    """`cached_attention` with the cache part read by the compiled CPU kernel (`cpu_kernels`): one pass over each
    row's committed keys, in the cache's layout, split over the intra-op threads; the block as in the XLA path."""
    S, K = k_BSKE.shape[1], k_BSKE.shape[2]
    q_BKME = _queries_per_kv_head(q_BTHE, K)
    kv_len_B = jnp.clip(mask.kv_len_B.astype(jnp.int32), 0, S)
    carry = cpu_kernels.decode_attention_partial(q_BKME, k_BSKE, v_BSKE, kv_len_B)
    return _finish_per_kv_head(q_BKME, carry, q_BTHE, mask, block_k, block_v)


def _over_cache_chunks(k_BSKE, v_BSKE, kv_len_B, kv_block: int, chunk, carry):
    """Fold `chunk(k_BsKE, v_BsKE, visible_Bs, carry)` over the committed cache, up to the longest row's length:
    chunks of BIG_CHUNKS * kv_block keys for the whole ones, then chunks of kv_block for the rest (fewer loop trips
    and per-chunk ops on long caches, reads past the length bounded by kv_block). A chunk that would run past the
    capacity is slid back to end at it; keys it re-reads (before its nominal start) are masked out."""
    S = k_BSKE.shape[1]
    max_len = jnp.max(kv_len_B)

    def loop(first, count, size, carry):
        def body(i, carry):
            nominal = first + i * size
            start = jnp.minimum(nominal, S - size)
            idx = start + jnp.arange(size)
            vis = (idx[None] < kv_len_B[:, None]) & (idx[None] >= nominal)
            return chunk(jax.lax.dynamic_slice_in_dim(k_BSKE, start, size, axis=1),
                         jax.lax.dynamic_slice_in_dim(v_BSKE, start, size, axis=1), vis, carry)
        return jax.lax.fori_loop(0, count, body, carry)

    kb = min(kv_block, S)
    big = min(BIG_CHUNKS * kb, S)
    n_big = max_len // big if big > kb else 0
    carry = loop(0, n_big, big, carry)
    done = n_big * big
    return loop(done, (max_len - done + kb - 1) // kb, kb, carry)


def _cached_attention_gemm(q_BTHE, k_BSKE, v_BSKE, mask: MaskSpec, *, block_k, block_v, kv_block: int,
                           whole_cache_fill: float):
    """`cached_attention` for a few query rows (AR decode, short chains): the cache is read in its own
    [B, S, K*E] layout by two plain GEMMs, the queries packed as a block-diagonal [K*G*T, K*E] matrix
    (column (j, m) reads head j only). K times the FLOPs of per-head products — nothing on a memory-bound
    step with few columns — and no transposes or batched small dots (roofline: the AR step at 4k–16k ~25 %
    faster than the transposed chunks). Once the longest row fills `whole_cache_fill` of the capacity the
    GEMMs run on the whole cache buffer in one pass (a runtime `cond`), below it on chunks up to the
    length, which XLA:CPU copies out of the cache first. Scores are [B, columns, keys]: keys minor, so the
    softmax's exp runs vectorised (the [B, keys, columns] layout measured ~2x slower there)."""
    B, T, H, E = q_BTHE.shape
    S, K = k_BSKE.shape[1], k_BSKE.shape[2]
    G, F = H // K, K * E
    M = G * T
    C = K * M
    q_BKME = _queries_per_kv_head(q_BTHE, K)
    eye_KK = jnp.eye(K, dtype=q_BTHE.dtype)
    q_BCF = (q_BKME[:, :, :, None, :] * eye_KK[None, :, None, :, None]).reshape(B, C, F)
    kv_len_B = jnp.clip(mask.kv_len_B.astype(jnp.int32), 0, S)

    def online(carry, k_BsF, v_BsF, vis_BCs):  # carry: [B, C], [B, C], [B, C, F]
        s_BCs = jnp.einsum("bcf,bsf->bcs", q_BCF, k_BsF, preferred_element_type=jnp.float32)
        return _online_update(carry, jnp.where(vis_BCs, s_BCs, -jnp.inf), lambda p: jnp.einsum(
            "bcs,bsf->bcf", p.astype(v_BsF.dtype), v_BsF, preferred_element_type=jnp.float32))

    def chunk(k_BsKE, v_BsKE, vis_Bs, carry):
        n = k_BsKE.shape[1]
        return online(carry, k_BsKE.reshape(B, n, F), v_BsKE.reshape(B, n, F), vis_Bs[:, None, :])

    init = (jnp.full((B, C), -jnp.inf, jnp.float32), jnp.zeros((B, C), jnp.float32),
            jnp.zeros((B, C, F), jnp.float32))

    def whole():
        return chunk(k_BSKE, v_BSKE, jnp.arange(S)[None] < kv_len_B[:, None], init)

    def chunked():
        return _over_cache_chunks(k_BSKE, v_BSKE, kv_len_B, kv_block, chunk, init)

    if S <= kv_block or whole_cache_fill <= 0:  # one chunk is the whole cache anyway
        carry = whole()
    elif whole_cache_fill > 1:
        carry = chunked()
    else:
        carry = jax.lax.cond(jnp.max(kv_len_B) >= math.ceil(whole_cache_fill * S), whole, chunked)
    N = block_k.shape[1]
    vis_blk = jnp.broadcast_to(mask.block_mask_BTN.astype(bool)[:, None, None, :, :],
                               (B, K, G, T, N)).reshape(B, C, N)  # column (j, g, t) of node n
    _, l_f, acc = online(carry, block_k.reshape(B, N, F), block_v.reshape(B, N, F), vis_blk)
    o_BKMKE = (acc / jnp.maximum(l_f, 1e-30)[..., None]).reshape(B, K, M, K, E)
    o_BKME = jnp.einsum("bkmje,kj->bkme", o_BKMKE, eye_KK)  # each column's own head
    return o_BKME.reshape(B, K, G, T, E).transpose(0, 3, 1, 2, 4).reshape(B, T, H, E).astype(q_BTHE.dtype)


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
    """Flash-style attention over the main keys (no extra block), differentiable through a custom VJP.

    Forward: query blocks in sequence (lax.map), an online-softmax loop over key blocks that stops at
    the last block any query of the block can see (causal / longest key length); saves the output and
    the per-row log-sum-exp. Backward (FlashAttention-2): recomputes the probabilities blockwise from
    the log-sum-exp; one scan over key blocks, each walking only the query blocks that can see it.
    Memory O(B*H*(T + q_block*kv_block)), never O(T*S). The loop bounds are dynamic (work follows the
    real lengths): fine inside a custom VJP, whose fwd/bwd are not themselves differentiated."""
    if mask.block_mask_BTN is not None or mask.key_visible_BS is not None:
        raise ValueError("blockwise_attention covers the main keys under kv_len_B / causal only (use "
                         "dense_attention for block_k or key_visible_BS)")
    T, S = q_BTHE.shape[1], k_BSKE.shape[1]
    st = _Flash(mask.causal, min(q_block, T), min(kv_block, S))
    kv_len_B = jnp.clip(mask.kv_len_B.astype(jnp.int32), 0, S)  # keys past S do not exist (padding is hidden)
    return _flash(st, q_BTHE, k_BSKE, v_BSKE, kv_len_B)


@dataclasses.dataclass(frozen=True)
class _Flash:
    causal: bool
    q_block: int
    kv_block: int


def _rows_layout(st: _Flash, x_BTHE, K: int):
    """[B, T, H, E] -> [nq, B, K, G*qb, E]: per query block and KV head, its G query heads stacked as rows
    (row r = query r % qb of head r // qb), padded to whole blocks."""
    B, _, H, E = x_BTHE.shape
    x = _pad_axis(x_BTHE, 1, st.q_block)
    nq = x.shape[1] // st.q_block
    return x.reshape(B, nq, st.q_block, K, H // K, E).transpose(1, 0, 3, 4, 2, 5).reshape(nq, B, K, -1, E)


def _keys_layout(st: _Flash, x_BSKE):
    """[B, S, K, E] -> [nk, B, K, kb, E] (padded to whole blocks): each block's keys of a KV head contiguous."""
    B, _, K, E = x_BSKE.shape
    x = _pad_axis(x_BSKE, 1, st.kv_block)
    return x.reshape(B, -1, st.kv_block, K, E).transpose(1, 0, 3, 2, 4)


def _block_visibility(st: _Flash, kv_len_B, qi, ki, G: int):
    """[B, 1, G*qb, kb] visibility of key block ki to the rows of query block qi (row r = query r % qb)."""
    k_idx = ki * st.kv_block + jnp.arange(st.kv_block)
    vis = k_idx[None, None, None, :] < kv_len_B[:, None, None, None]
    if st.causal:
        q_idx = qi * st.q_block + jnp.tile(jnp.arange(st.q_block), G)
        vis = vis & (k_idx[None, :] <= q_idx[:, None])[None, None]
    return vis


def _n_key_blocks(st: _Flash, qi, kv_len_B, nk):
    """Key blocks query block qi needs: up to the longest row's length, and (causal) its last query."""
    n = jnp.minimum((jnp.max(kv_len_B) + st.kv_block - 1) // st.kv_block, nk)
    if st.causal:
        n = jnp.minimum(n, ((qi + 1) * st.q_block + st.kv_block - 1) // st.kv_block)
    return n


def _n_full_key_blocks(st: _Flash, qi, kv_len_B):
    """Leading key blocks every row of query block qi sees whole (inside every row's length, and before the block's
    first query): they need no mask."""
    n = jnp.min(kv_len_B) // st.kv_block
    if st.causal:
        n = jnp.minimum(n, (qi * st.q_block + 1) // st.kv_block)
    return n


def _flash_forward(st: _Flash, q_BTHE, k_BSKE, v_BSKE, kv_len_B):
    """(output [B, T, H, E] in q's dtype, log-sum-exp [nq, B, K, G*qb] fp32; 0 for rows with no key).

    Laid out once for XLA:CPU's batched GEMMs (batch dims leading, no transpose inside the loops): the queries
    pre-scaled as [nq, B, K, G*qb, E], keys and values as [nk, B, K, kb, E]. Key blocks every query of the block
    sees whole skip the mask; only the diagonal / ragged-end blocks build it. LM prefill at 16k tokens on the
    shipped target: 11.1 -> 7.7 s with this layout and 256 x 512 blocks (BENCHMARKS "Prefill at long video")."""
    B, T, H, E = q_BTHE.shape
    K = k_BSKE.shape[2]
    G = H // K
    q_nBKRE = _rows_layout(st, q_BTHE * jnp.asarray(1.0 / math.sqrt(E), q_BTHE.dtype), K)
    k_nBKkE, v_nBKkE = _keys_layout(st, k_BSKE), _keys_layout(st, v_BSKE)
    nq, nk, R = q_nBKRE.shape[0], k_nBKkE.shape[0], q_nBKRE.shape[3]

    def one_q_block(args):
        qi, q_BKRE = args
        n = _n_key_blocks(st, qi, kv_len_B, nk)
        n_full = jnp.minimum(_n_full_key_blocks(st, qi, kv_len_B), n)

        def step(ki, carry, masked: bool):
            m_i, l_i, acc = carry
            s = jnp.einsum("bkre,bkse->bkrs", q_BKRE, k_nBKkE[ki], preferred_element_type=jnp.float32)
            if masked:
                s = jnp.where(_block_visibility(st, kv_len_B, qi, ki, G), s, -jnp.inf)
            m_new = jnp.maximum(m_i, jnp.max(s, axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0) if masked else m_new  # a whole block: finite
            p = jnp.exp(s - m_safe[..., None])  # masked scores are -inf: p = 0
            corr = jnp.exp(m_i - m_safe)  # m_i = -inf (nothing seen yet): 0
            l_new = l_i * corr + jnp.sum(p, axis=-1)
            acc = acc * corr[..., None] + jnp.einsum("bkrs,bkse->bkre", p.astype(v_nBKkE.dtype), v_nBKkE[ki],
                                                     preferred_element_type=jnp.float32)
            return m_new, l_new, acc

        init = (jnp.full((B, K, R), -jnp.inf, jnp.float32), jnp.zeros((B, K, R), jnp.float32),
                jnp.zeros((B, K, R, E), jnp.float32))
        carry = jax.lax.fori_loop(0, n_full, lambda ki, c: step(ki, c, False), init)
        m_f, l_f, acc = jax.lax.fori_loop(n_full, n, lambda ki, c: step(ki, c, True), carry)
        o = acc / jnp.maximum(l_f, 1e-30)[..., None]
        lse = jnp.where(l_f > 0, m_f + jnp.log(jnp.maximum(l_f, 1e-30)), 0.0)
        return o.astype(q_BTHE.dtype), lse

    o_nBKRE, lse_nBKR = jax.lax.map(one_q_block, (jnp.arange(nq), q_nBKRE))
    return _rows_to_BTHE(st, o_nBKRE, T, G), lse_nBKR


def _rows_to_BTHE(st: _Flash, x_nBKRE, T: int, G: int):
    nq, B, K, _, E = x_nBKRE.shape
    return x_nBKRE.reshape(nq, B, K, G, st.q_block, E).transpose(1, 0, 4, 2, 3, 5).reshape(B, -1, K * G, E)[:, :T]


def _flash_fwd(st, q_BTHE, k_BSKE, v_BSKE, kv_len_B):
    o_BTHE, lse = _flash_forward(st, q_BTHE, k_BSKE, v_BSKE, kv_len_B)
    return o_BTHE, (q_BTHE, k_BSKE, v_BSKE, kv_len_B, o_BTHE, lse)


def _flash_bwd(st: _Flash, res, do_BTHE):
    """FlashAttention-2 backward in the forward's layout: one scan over key blocks, each walking only the query
    blocks that can see it (the ones that see it whole without a mask)."""
    q_BTHE, k_BSKE, v_BSKE, kv_len_B, o_BTHE, lse_nBKR = res
    B, T, H, E = q_BTHE.shape
    S, K = k_BSKE.shape[1], k_BSKE.shape[2]
    G, qb, kb = H // K, st.q_block, st.kv_block
    scale = 1.0 / math.sqrt(E)
    q_nBKRE = _rows_layout(st, q_BTHE * jnp.asarray(scale, q_BTHE.dtype), K)  # scores as in the forward
    do_nBKRE = _rows_layout(st, do_BTHE, K)  # padded rows: dO = 0
    delta_nBKR = jnp.sum(do_nBKRE.astype(jnp.float32) * _rows_layout(st, o_BTHE, K).astype(jnp.float32), -1)
    k_nBKkE, v_nBKkE = _keys_layout(st, k_BSKE), _keys_layout(st, v_BSKE)
    nq, nk = q_nBKRE.shape[0], k_nBKkE.shape[0]
    max_len = jnp.max(kv_len_B)

    def one_kv_block(dq_nBKRE, ki):
        k_blk, v_blk = k_nBKkE[ki], v_nBKkE[ki]  # [B, K, kb, E]
        first = (ki * kb) // qb if st.causal else 0  # earlier queries cannot see this block
        last = jnp.where(ki * kb < max_len, nq, first)  # block past every row's length: no work
        # query blocks from `whole` on see this block whole (after its last key, and it lies inside every length)
        whole = -(-((ki + 1) * kb - 1) // qb) if st.causal else 0
        whole = jnp.where((ki + 1) * kb <= jnp.min(kv_len_B), jnp.clip(whole, first, last), last)

        def body(qi, carry, masked: bool):
            dk, dv, dq_all = carry
            q_blk, do_blk = q_nBKRE[qi], do_nBKRE[qi]  # [B, K, R, E]
            p = jnp.exp(jnp.einsum("bkre,bkse->bkrs", q_blk, k_blk, preferred_element_type=jnp.float32)
                        - lse_nBKR[qi][..., None])  # [B, K, R, kb]
            if masked:
                p = jnp.where(_block_visibility(st, kv_len_B, qi, ki, G), p, 0.0)  # rows with no key stay 0
            dp = jnp.einsum("bkre,bkse->bkrs", do_blk, v_blk, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_nBKR[qi][..., None])
            dv = dv + jnp.einsum("bkrs,bkre->bkse", p.astype(do_blk.dtype), do_blk, preferred_element_type=jnp.float32)
            dk = dk + jnp.einsum("bkrs,bkre->bkse", ds.astype(q_blk.dtype), q_blk, preferred_element_type=jnp.float32)
            dq = jnp.einsum("bkrs,bkse->bkre", ds.astype(k_blk.dtype), k_blk, preferred_element_type=jnp.float32)
            return dk, dv, dq_all.at[qi].add(dq)

        zeros = jnp.zeros((B, K, kb, E), jnp.float32)
        carry = jax.lax.fori_loop(first, whole, lambda qi, c: body(qi, c, True), (zeros, zeros, dq_nBKRE))
        dk, dv, dq_nBKRE = jax.lax.fori_loop(whole, last, lambda qi, c: body(qi, c, False), carry)
        return dq_nBKRE, (dk, dv)

    dq_nBKRE, (dk_nBKkE, dv_nBKkE) = jax.lax.scan(one_kv_block, jnp.zeros(q_nBKRE.shape, jnp.float32),
                                                   jnp.arange(nk))
    dq = (_rows_to_BTHE(st, dq_nBKRE, T, G) * scale).astype(q_BTHE.dtype)
    keys_back = lambda x: x.transpose(1, 0, 3, 2, 4).reshape(B, nk * kb, K, E)[:, :S]  # noqa: E731
    return dq, keys_back(dk_nBKkE).astype(k_BSKE.dtype), keys_back(dv_nBKkE).astype(v_BSKE.dtype), None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st: _Flash, q_BTHE, k_BSKE, v_BSKE, kv_len_B):
    return _flash_forward(st, q_BTHE, k_BSKE, v_BSKE, kv_len_B)[0]


_flash.defvjp(_flash_fwd, _flash_bwd)

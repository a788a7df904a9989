"""Blockwise (flash) prefill attention with per-row key lengths, optional causality and optional
segment ids, differentiable through a custom VJP whose backward is two Pallas kernels.

Forward kernel: grid (B, K, q_blocks). Program (b, h, i) holds `block_q` query rows of KV head h's
group (rows ordered (t, g): GQA shares every K/V block load across the group) and runs an online
softmax over key blocks, stopping at the last block any of its rows can see (kv_len[b]; causal:
the block's last token). It writes the output and the per-row log-sum-exp (kept for backward).

Backward (FlashAttention-2): delta = rowsum(dO * O) in jnp, then
- dq kernel, grid (B, K, q_blocks): recompute p = exp(s - lse) per key block, dq += (p * (dO V^T - delta)) K;
- dk/dv kernel, grid (B, K, kv_blocks): walk the query blocks that can see the key block,
  dv += p^T dO, dk += (p * (dO V^T - delta))^T Q; the G heads of a group are rows of the same
  program, so their contributions to the shared K/V head are summed in-kernel.

Visibility of key j for query token t (row r = t * G + g): j < kv_len[b], and j <= t if causal
(tested as j * G <= r), and q_segment[t] == kv_segment[j] when segment ids are given. Vision
attention (frame groups, windows) uses either segments gathered into the batch axis with per-row
lengths (what `Qwen25VL` does) or explicit segment ids in one row.
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
class _Static:
    causal: bool
    G: int
    block_q: int
    block_kv: int
    segments: bool
    backend: C.Backend
    scale: float  # 1/sqrt(head_dim) of the unpadded head dim


def _visible(st: _Static, rows_start, keys_start, shape, length, qseg=None, kvseg=None):
    r = rows_start + lax.broadcasted_iota(jnp.int32, shape, 0)
    j = keys_start + lax.broadcasted_iota(jnp.int32, shape, 1)
    vis = j < length
    if st.causal:
        vis = vis & (j * st.G <= r)
    if st.segments:
        vis = vis & (qseg == kvseg)
    return vis


def _n_kv_blocks(st: _Static, i, length, n_total):
    """Key blocks query block i needs: up to the row length, and (causal) up to its last token."""
    n = jnp.minimum(C.cdiv(length, st.block_kv), n_total)
    if st.causal:
        last_tok = ((i + 1) * st.block_q - 1) // st.G
        n = jnp.minimum(n, last_tok // st.block_kv + 1)
    return n


def _split_refs(refs, segments: bool, n_in: int):
    ins, outs = refs[:n_in], refs[n_in:]
    if segments:
        return ins[:-2], ins[-2], ins[-1], outs
    return ins, None, None, outs


def _fwd_kernel(lens_ref, *refs, st: _Static):
    scale = st.scale
    (q_ref, k_ref, v_ref), qs_ref, ks_ref, (o_ref, lse_ref) = _split_refs(refs, st.segments, 3 + 2 * st.segments)
    b, i = pl.program_id(0), pl.program_id(2)
    length = lens_ref[b]
    q = q_ref[...]
    R, E = q.shape
    bk = st.block_kv
    qseg = qs_ref[...] if st.segments else None  # [R, 1]

    def body(j, carry):
        start = pl.multiple_of(j * bk, bk)
        kvseg = ks_ref[:, pl.ds(start, bk)] if st.segments else None  # [1, bk]
        vis = _visible(st, i * st.block_q, start, (R, bk), length, qseg, kvseg)
        return C.online_step(q, k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :], vis, carry, scale)

    carry = lax.fori_loop(0, _n_kv_blocks(st, i, length, k_ref.shape[0] // bk), body, C.init_carry(R, E))
    o, lse = C.finish(carry)
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


def _dq_kernel(lens_ref, *refs, st: _Static):
    scale = st.scale
    (q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref), qs_ref, ks_ref, (dq_ref,) = _split_refs(
        refs, st.segments, 6 + 2 * st.segments)
    b, i = pl.program_id(0), pl.program_id(2)
    length = lens_ref[b]
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[:, pl.ds(0, 1)], dl_ref[:, pl.ds(0, 1)]  # [R, 1]
    R, E = q.shape
    bk = st.block_kv
    qseg = qs_ref[...] if st.segments else None

    def body(j, dq):
        start = pl.multiple_of(j * bk, bk)
        k, v = k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :]
        kvseg = ks_ref[:, pl.ds(start, bk)] if st.segments else None
        vis = _visible(st, i * st.block_q, start, (R, bk), length, qseg, kvseg)
        p = jnp.where(vis, jnp.exp(C.scores(q, k, scale) - lse), 0.0)
        dp = C.scores(do, v, 1.0)
        ds = p * (dp - delta)
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    dq = lax.fori_loop(0, _n_kv_blocks(st, i, length, k_ref.shape[0] // bk), body, jnp.zeros((R, E), jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(lens_ref, *refs, st: _Static):
    scale = st.scale
    (q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref), qs_ref, ks_ref, (dk_ref, dv_ref) = _split_refs(
        refs, st.segments, 6 + 2 * st.segments)
    b, j = pl.program_id(0), pl.program_id(2)
    length = lens_ref[b]
    k, v = k_ref[...], v_ref[...]
    bk, E = k.shape
    bq = st.block_q
    kstart = j * bk
    n_q = q_ref.shape[0] // bq
    first = jnp.minimum((kstart * st.G) // bq, n_q) if st.causal else 0
    last = jnp.where(kstart < length, n_q, first)  # key block entirely past the length: no work
    kvseg = ks_ref[...] if st.segments else None  # [1, bk]

    def body(i, carry):
        dk, dv = carry
        rs = pl.multiple_of(i * bq, bq)
        q, do = q_ref[pl.ds(rs, bq), :], do_ref[pl.ds(rs, bq), :]
        lse, delta = lse_ref[pl.ds(rs, bq), pl.ds(0, 1)], dl_ref[pl.ds(rs, bq), pl.ds(0, 1)]
        qseg = qs_ref[pl.ds(rs, bq), :] if st.segments else None
        vis = _visible(st, rs, kstart, (bq, bk), length, qseg, kvseg)
        p = jnp.where(vis, jnp.exp(C.scores(q, k, scale) - lse), 0.0)  # [bq, bk]
        dv = dv + lax.dot_general(p.astype(do.dtype), do, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        ds = p * (C.scores(do, v, 1.0) - delta)
        dk = dk + lax.dot_general(ds.astype(q.dtype), q, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return dk, dv

    zeros = jnp.zeros((bk, E), jnp.float32)
    dk, dv = lax.fori_loop(first, last, body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _specs_rows(st, n_rows_block, E, nl, with_grad: bool):
    """Specs for programs that own one query block (forward, dq)."""
    bq = st.block_q
    s = [pl.BlockSpec((None, None, bq, E), lambda b, h, i, *_: (b, h, i, 0))]
    kv = pl.BlockSpec((None, n_rows_block, E), lambda b, h, i, *_: (b, 0, h))
    s += [kv, kv]
    if with_grad:
        s += [pl.BlockSpec((None, None, bq, E), lambda b, h, i, *_: (b, h, i, 0)),
              pl.BlockSpec((None, None, bq, nl), lambda b, h, i, *_: (b, h, i, 0)),
              pl.BlockSpec((None, None, bq, nl), lambda b, h, i, *_: (b, h, i, 0))]
    if st.segments:
        s += [pl.BlockSpec((None, bq, 1), lambda b, h, i, *_: (b, i, 0)),
              pl.BlockSpec((None, 1, n_rows_block), lambda b, h, i, *_: (b, 0, 0))]
    return s


def _fwd_call(st: _Static, q, k, v, lens, qseg, kvseg):
    B, K, R, E = q.shape
    S = k.shape[1]
    nl = C.lanes(st.backend.style)
    kernel = functools.partial(_fwd_kernel, st=st)
    out_specs = [pl.BlockSpec((None, None, st.block_q, E), lambda b, h, i, *_: (b, h, i, 0)),
                 pl.BlockSpec((None, None, st.block_q, nl), lambda b, h, i, *_: (b, h, i, 0))]
    out_shape = [jax.ShapeDtypeStruct((B, K, R, E), q.dtype), jax.ShapeDtypeStruct((B, K, R, nl), jnp.float32)]
    ops = [q, k, v] + ([qseg, kvseg] if st.segments else [])
    return C.call(kernel, backend=st.backend, grid=(B, K, R // st.block_q), in_specs=_specs_rows(st, S, E, nl, False),
                  out_specs=out_specs, out_shape=out_shape, lens=lens, operands=ops, name="prefill_attention_fwd")


def _bwd_calls(st: _Static, q, k, v, lens, qseg, kvseg, o, lse, do):
    B, K, R, E = q.shape
    S = k.shape[1]
    nl = C.lanes(st.backend.style)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
    delta = jnp.broadcast_to(delta, (B, K, R, nl))
    segs = [qseg, kvseg] if st.segments else []
    dq = C.call(functools.partial(_dq_kernel, st=st), backend=st.backend,
                grid=(B, K, R // st.block_q), in_specs=_specs_rows(st, S, E, nl, True),
                out_specs=pl.BlockSpec((None, None, st.block_q, E), lambda b, h, i, *_: (b, h, i, 0)),
                out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype), lens=lens,
                operands=[q, k, v, do, lse, delta] + segs, name="prefill_attention_dq")
    bk = st.block_kv
    kv_blk = pl.BlockSpec((None, bk, E), lambda b, h, j, *_: (b, j, h))
    rows_all = pl.BlockSpec((None, None, R, E), lambda b, h, j, *_: (b, h, 0, 0))
    stats_all = pl.BlockSpec((None, None, R, nl), lambda b, h, j, *_: (b, h, 0, 0))
    in_specs = [rows_all, kv_blk, kv_blk, rows_all, stats_all, stats_all]
    if st.segments:
        in_specs += [pl.BlockSpec((None, R, 1), lambda b, h, j, *_: (b, 0, 0)),
                     pl.BlockSpec((None, 1, bk), lambda b, h, j, *_: (b, 0, j))]
    dk, dv = C.call(functools.partial(_dkv_kernel, st=st), backend=st.backend,
                    grid=(B, K, S // bk), in_specs=in_specs, out_specs=[kv_blk, kv_blk],
                    out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
                    lens=lens, operands=[q, k, v, do, lse, delta] + segs, name="prefill_attention_dkv")
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _prefill_core(st: _Static, q, k, v, lens, qseg, kvseg):
    return _fwd_call(st, q, k, v, lens, qseg, kvseg)[0]


def _prefill_fwd(st, q, k, v, lens, qseg, kvseg):
    o, lse = _fwd_call(st, q, k, v, lens, qseg, kvseg)
    return o, (q, k, v, lens, qseg, kvseg, o, lse)


def _prefill_bwd(st, res, do):
    q, k, v, lens, qseg, kvseg, o, lse = res
    dq, dk, dv = _bwd_calls(st, q, k, v, lens, qseg, kvseg, o, lse, do)
    return dq, dk, dv, None, None, None


_prefill_core.defvjp(_prefill_fwd, _prefill_bwd)


def prefill_attention(q_BTHE, k_BSKE, v_BSKE, kv_len_B, *, causal: bool, q_segment_ids=None, kv_segment_ids=None,
                      block_q: int = 128, block_kv: int = 128, backend: C.Backend | None = None):
    """q [B, T, H, E], k/v [B, S, K, E] (S == T when causal); keys valid below kv_len_B[b];
    optional segment ids q [B, T] / kv [B, S] (int; a query sees only keys of its segment).
    Differentiable in q, k, v (custom VJP, Pallas backward kernels). Any head_dim: it is zero-padded
    to the backend's block rule (a copy of q/k/v; scores are unchanged). Returns [B, T, H, E]."""
    backend = backend or C.Backend.detect()
    B, T, H, E = q_BTHE.shape
    S, K = k_BSKE.shape[1], k_BSKE.shape[2]
    assert H % K == 0, f"query heads {H} not a multiple of kv heads {K}"
    assert not causal or S == T, f"causal prefill needs keys of the same sequence (T {T}, S {S})"
    assert (q_segment_ids is None) == (kv_segment_ids is None), "give both segment id arrays or neither"
    G = H // K
    style = backend.style
    bq = C.row_block(T * G, block_q, style)
    bkv = C.pick_kv_block(S, block_kv, style)
    Ep = C.padded_head_dim(E, style)
    C.check_blocks(style, rows=bq, kv=bkv, head_dim=Ep)
    R, S_pad = C.round_up(T * G, bq), C.round_up(S, bkv)
    segments = q_segment_ids is not None
    st = _Static(causal, G, bq, bkv, segments, backend, C.scale_for(E))
    q = C.fold_queries(C.pad_axis(q_BTHE, 3, Ep), K, R)
    k = C.kv_view(C.pad_axis(C.pad_axis(k_BSKE, 3, Ep), 1, S_pad))
    v = C.kv_view(C.pad_axis(C.pad_axis(v_BSKE, 3, Ep), 1, S_pad))
    qseg = kvseg = None
    if segments:
        qseg = C.rows_of_tokens(q_segment_ids.astype(jnp.int32), G, R, value=-1)[..., None]  # [B, R, 1]
        kvseg = C.pad_axis(kv_segment_ids.astype(jnp.int32), 1, S_pad, value=-2)[:, None, :]  # [B, 1, S]
    o = _prefill_core(st, q, k, v, C.lens_operand(kv_len_B, S, style), qseg, kvseg)
    return C.unfold_rows(o, T, H)[..., :E]

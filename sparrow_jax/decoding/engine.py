"""The jitted speculative decoding engine (SPEC §2).

After prefill (target on the whole prompt; draft on its own items, laid out by the visual view it was
trained for — models/views.py — from (t1, h0) on, as the official code), the whole generation is one
`jax.lax.while_loop` over rounds; each round, for B static rows at once:

1. draft catch-up: the draft processes the pending (token, target hidden) pairs — the path accepted
   last round and the new root — and commits their K/V (the draft cache only ever grows with
   committed tokens);
2. tree: EAGLE-2 expansion from the root (`tree.py`), the draft attending to its cache plus the
   tree nodes it has fed;
3. verify: one target forward over the N tree nodes (tree mask, positions = length + depth + rope delta);
4. accept (`acceptance.py`) and commit the accepted path's target K/V; emit path + bonus, stop rows on
   EOS / max tokens.

Pending pairs: after accepting path n0..n_k (n0 = root) with bonus b, the draft's next inputs are
(n1, h(n0)), ..., (n_k, h(n_{k-1})), (b, h(n_k)) with h the target's final-norm hidden states from
verify — exact features, never the draft's own guesses.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparrow_jax.decoding.acceptance import accept_greedy, accept_sampling
from sparrow_jax.decoding.placement import Placement, put
from sparrow_jax.decoding.autoregressive import cache_capacity
from sparrow_jax.decoding import streaming
from sparrow_jax.decoding.sampling import SamplingArrays, as_sampling, select_tokens
from sparrow_jax.decoding.tree import Tree, TreeSpec, select_tree
from sparrow_jax.models import attention as attn_lib
from sparrow_jax.models import registry
from sparrow_jax.models import target as tg
from sparrow_jax.models import views
from sparrow_jax.models.attention import XLA, AttentionImpl
from sparrow_jax.models.kv_cache import KVCache, commit
from sparrow_jax.runtime import graph_jit

# Decode modes and the draft view each runs (models/views.py): text_only = Sparrow/EAGLE (view none),
# ivsb_mid = bridged layer-m* visual states, full_visual = MSD-style, pruned_visual = pruned-visual
# EAGLE-style draft (SpecVLM's token drop, not SpecVLM itself).
VISUAL_MODES = views.MODES


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """What shapes the compiled loop (a static jit argument). Sampling settings are traced per-row
    arrays and the streaming hook a traced id, both passed next to it (sampling.py, streaming.py).
    `impl`: the attention implementation; "xla" / "pallas" are converted here, once."""

    tree: TreeSpec
    max_new_tokens: int
    eos_ids: tuple[int, ...] = ()
    impl: AttentionImpl = XLA

    def __post_init__(self):
        object.__setattr__(self, "impl", AttentionImpl.of(self.impl))

    @property
    def block(self) -> int:
        """Pending block size: at most `tree.max_draft_tokens` (= depth + 1) accepted drafts + the bonus."""
        return self.tree.max_draft_tokens + 1

    @property
    def cache_slack(self) -> int:
        """Cache slots past prompt + max_new_tokens: every round writes a full block at each row's length
        (done rows too), one more than the committed tokens can fill (see `check_capacity`)."""
        return 2 * self.block + self.tree.total_tokens


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SpecResult:
    tokens_BM: jax.Array
    num_tokens_B: jax.Array
    # Per round: tokens emitted (accepted drafts + bonus, cut at EOS / max_new_tokens), 0 = row inactive.
    accepted_BR: jax.Array
    cut_BR: jax.Array  # the round's emission was cut short: its drafts past the cut are not observed
    rounds: jax.Array  # loop iterations run
    tcache: KVCache
    dcache: KVCache


# ----------------------------------------------------------------------------------- host helpers


PRUNE_RULES = views.PRUNE_RULES


@dataclasses.dataclass(frozen=True)
class DraftLayout:
    """The draft's items for a batch in one view (host-built from `views.sequence_layout`, right-padded
    to a bucket). With pruning by attention the visual items are chosen on device in prefill:
    `idx_BP` is then a placeholder and `keep_vis_B` the visual count per row."""

    view: str
    idx_BP: jax.Array  # sequence positions of the items
    pos_BP: jax.Array  # their draft (RoPE) positions
    len_B: jax.Array
    next_pos_B: jax.Array  # draft position of the first generated token's item
    keep_vis_B: jax.Array
    by_attention: bool = False


def draft_layout(prompts, view: str, *, keep_fraction: float = views.DEFAULT_KEEP_FRACTION,
                 prune_by: str = "uniform") -> DraftLayout:
    """Host: the draft's items per prompt in `view` (see models/views.py)."""
    views.check_view(view)
    views.check_prune(keep_fraction, prune_by)
    by_attention = view == "pruned" and prune_by == "attention"
    rows, keeps = [], []
    for p in prompts:
        is_vis = np.asarray(p.mm_token_type_ids) != 0
        n_vis = int(is_vis.sum())
        kept = views.kept_visual(n_vis, keep_fraction) if view == "pruned" else None
        if by_attention:  # device picks the visual items: size the rows, positions are item indices
            src, _, _, _ = views.sequence_layout(is_vis, "none")
            n = len(src) + len(kept)
            rows.append((np.zeros(n, np.int64), np.arange(n), n))
        else:
            src, _, pos, nxt = views.sequence_layout(is_vis, view, kept)
            rows.append((src, pos, nxt))
        keeps.append(0 if kept is None else len(kept))
    P = tg.bucket(max(len(r[0]) for r in rows))
    idx, pos = np.zeros((len(rows), P), np.int32), np.zeros((len(rows), P), np.int32)
    for b, (src, ps, _) in enumerate(rows):
        idx[b, :len(src)], pos[b, :len(src)] = src, ps
        pos[b, len(src):] = ps[-1] + 1 + np.arange(P - len(src)) if len(src) else np.arange(P)
    return DraftLayout(view, jnp.asarray(idx), jnp.asarray(pos), jnp.asarray([len(r[0]) for r in rows], jnp.int32),
                       jnp.asarray([r[2] for r in rows], jnp.int32), jnp.asarray(keeps, jnp.int32), by_attention)


def draft_positions(prompts, mode: str, T: int, keep_fraction: float = views.DEFAULT_KEEP_FRACTION):
    """Sequence positions of the draft's items for `mode`'s view (uniform pruning), right-padded:
    (idx_BP, len_B, keep_vis_B). See `draft_layout` for the positions and the other fields."""
    del T
    lay = draft_layout(prompts, views.view_for_mode(mode), keep_fraction=keep_fraction)
    return lay.idx_BP, lay.len_B, lay.keep_vis_B


def draft_sequence(draft, e_BPD, hprev_BPD, text_BP, pos_BP, len_B, impl: AttentionImpl = XLA):
    """The draft over its items (views: text items through the FC, visual items as given): output
    states [B, P, D] and per-layer K/V. The same function the trainer's pass 0 computes per slot."""
    x = draft.view_input(e_BPD, hprev_BPD, text_BP)
    return draft.run_layers(x, pos_BP, attn_lib.MaskSpec(kv_len_B=len_B, causal=True), impl=impl)


@graph_jit(graphs=("dgraph",), static_argnames=("dgraph", "capacity", "impl", "outputs"))
def draft_prefill(dgraph, dparams, e_BPD, hprev_BPD, text_BP, pos_BP, len_B, next_pos_B, *, capacity: int,
                  impl: AttentionImpl = XLA, outputs: bool = False):
    """Run the draft over its prompt items and return its cache (rows valid up to len_B; the next item
    sits at draft position next_pos_B), and with `outputs` also the output states [B, P, D]."""
    draft = nnx.merge(dgraph, dparams)
    B, P, _ = e_BPD.shape
    h_BPD, kvs = draft_sequence(draft, e_BPD, hprev_BPD, text_BP, pos_BP, len_B, impl)
    cfg = draft.cfg
    cache = KVCache.empty(cfg.num_layers, B, capacity, cfg.num_key_value_heads, cfg.head_dim, e_BPD.dtype)
    cache = dataclasses.replace(commit(cache, kvs, jnp.broadcast_to(jnp.arange(P)[None], (B, P)), len_B),
                                pos_offset_B=(next_pos_B - len_B).astype(jnp.int32))
    return (cache, h_BPD) if outputs else cache


@functools.lru_cache(maxsize=32)
def sharded_draft_prefill(dgraph, placement: Placement, *, capacity: int, impl: AttentionImpl = XLA,
                          outputs: bool = False):
    """`draft_prefill` on `placement`'s mesh (the draft replicated, its items and cache split by row):
    (jitted fn of (dparams, e, hprev, text, pos, len, next_pos), its in_shardings)."""
    rows = placement.rows
    ins = (placement.replicated,) + (rows,) * 6
    outs = (placement.draft_cache, rows) if outputs else placement.draft_cache

    def fn(dparams, *items):
        return draft_prefill(dgraph, dparams, *items, capacity=capacity, impl=impl, outputs=outputs)
    return jax.jit(fn, in_shardings=ins, out_shardings=outs), ins


# --------------------------------------------------------------------------------------- the loop


def _take(x, idx):
    """x [B, N, ...] gathered at idx [B, M] -> [B, M, ...]."""
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def build_tree(target, draft, dcache: KVCache, h_root_BD, root_B, spec: TreeSpec, impl: AttentionImpl) -> Tree:
    """EAGLE-2 expansion (see tree.py; cnets1.py `topK_genrate`): level 1 from the root's draft output,
    then `spec.depth` steps, each feeding the k-node frontier and adding its k*k children, so levels run
    1..depth+1. The root's pair is already in the draft cache, so the root sits at draft position
    p = dcache.next_position() - 1 (= length - 1 unless the view offsets positions) and a node of level d at p + d."""
    B = root_B.shape[0]
    K, D, P, F = spec.top_k, spec.max_draft_tokens, spec.pool_size, spec.fed_nodes
    logp1 = jax.nn.log_softmax(target.logits(h_root_BD).astype(jnp.float32), -1)
    s1, t1 = jax.lax.top_k(logp1, K)
    pool_tok = jnp.zeros((B, P), jnp.int32).at[:, :K].set(t1)
    pool_score = jnp.full((B, P), -jnp.inf, jnp.float32).at[:, :K].set(s1)
    pool_parent = jnp.full((B, P), -1, jnp.int32)
    pool_depth = jnp.ones((B, P), jnp.int32)
    if D > 1:
        cfg = draft.cfg
        fed = [(jnp.zeros((B, F, cfg.num_key_value_heads, cfg.head_dim), h_root_BD.dtype),) * 2
               for _ in range(cfg.num_layers)]
        fed_anc = jnp.zeros((B, F, F), bool)
        front_pool = jnp.broadcast_to(jnp.arange(K)[None], (B, K))
        front_tok, front_score = t1, s1
        front_h = jnp.broadcast_to(h_root_BD[:, None], (B, K, h_root_BD.shape[-1]))
        front_parent_slot = jnp.full((B, K), -1, jnp.int32)
        caches = list(zip(dcache.k, dcache.v))
        for s in range(2, D + 1):
            slots = (s - 2) * K + jnp.arange(K)
            own = slots[None, :, None] == jnp.arange(F)[None, None]  # [1, K, F]
            inherited = jnp.where((front_parent_slot >= 0)[..., None], _take(fed_anc, jnp.maximum(front_parent_slot, 0)),
                                  False)
            fed_anc = fed_anc.at[:, slots].set(inherited | own)
            block_mask = jnp.concatenate([inherited, jnp.broadcast_to(jnp.eye(K, dtype=bool)[None], (B, K, K))], -1)
            pos = jnp.broadcast_to((dcache.next_position() - 1 + (s - 1))[:, None], (B, K))
            mask = attn_lib.MaskSpec(kv_len_B=dcache.lengths_B, block_mask_BTN=block_mask)
            out_h, kvs = draft(target.embed(front_tok), front_h, pos, mask, caches=caches, impl=impl, block_prefix=fed)
            fed = [(fk.at[:, slots].set(k), fv.at[:, slots].set(v)) for (fk, fv), (k, v) in zip(fed, kvs)]
            logp = jax.nn.log_softmax(target.logits(out_h).astype(jnp.float32), -1)
            cs, ct = jax.lax.top_k(logp, K)  # [B, K, K]
            cum = (front_score[:, :, None] + cs).reshape(B, K * K)
            ct = ct.reshape(B, K * K)
            at = K + (s - 2) * K * K
            pool_tok = jax.lax.dynamic_update_slice(pool_tok, ct, (0, at))
            pool_score = jax.lax.dynamic_update_slice(pool_score, cum, (0, at))
            pool_parent = jax.lax.dynamic_update_slice(pool_parent, jnp.repeat(front_pool, K, axis=1), (0, at))
            pool_depth = jax.lax.dynamic_update_slice(pool_depth, jnp.full((B, K * K), s, jnp.int32), (0, at))
            if s < D:
                front_score, pick = jax.lax.top_k(cum, K)
                front_pool = at + pick
                front_tok = jnp.take_along_axis(ct, pick, 1)
                front_h = _take(out_h, pick // K)
                front_parent_slot = jnp.take_along_axis(jnp.broadcast_to(slots[None], (B, K)), pick // K, 1)
    return select_tree(root_B, pool_tok, pool_score, pool_parent, pool_depth, spec)


def _is_eos(tok, eos_ids):
    if not eos_ids:
        return jnp.zeros(tok.shape, bool)
    return jnp.isin(tok, jnp.asarray(eos_ids, jnp.int32))


def draft_phase(target, draft, dcache: KVCache, pend_tok_BL, pend_h_BLD, pend_n_B, active_B, cfg: EngineConfig):
    """Catch-up on the pending pairs (committed to the draft cache), then the draft tree."""
    B, L = pend_tok_BL.shape
    arL = jnp.arange(L)
    dpos = dcache.next_position()[:, None] + arL[None]
    blk = jnp.tril(jnp.ones((L, L), bool))[None] & (arL[None, None] < pend_n_B[:, None, None])
    h_out, kvs = draft(target.embed(pend_tok_BL), pend_h_BLD, dpos,
                       attn_lib.MaskSpec(kv_len_B=dcache.lengths_B, block_mask_BTN=blk),
                       caches=list(zip(dcache.k, dcache.v)), impl=cfg.impl)
    last = (pend_n_B - 1)[:, None]
    h_root = _take(h_out, last)[:, 0]
    # The write indices are read from the catch-up's output (always 0 + arange: argmax >= 0), so the cache
    # write depends on the cache read and XLA updates it in place; with constant indices it copies the
    # draft's K and V twice per round (as the AR loop did, see autoregressive.ar_loop).
    idx_BL = arL[None] + jnp.minimum(jnp.argmax(h_root, -1), 0)[:, None]
    dcache = commit(dcache, kvs, idx_BL, jnp.where(active_B, pend_n_B, 0))
    root = jnp.take_along_axis(pend_tok_BL, last, 1)[:, 0]
    return dcache, build_tree(target, draft, dcache, h_root, root, cfg.tree, cfg.impl)


def verify_phase(target, tcache: KVCache, tree: Tree, rope_delta_B, key, cfg: EngineConfig,
                 sampling: SamplingArrays | None = None):
    """Target forward over the tree and the acceptance rule (greedy when `sampling` is None)."""
    tpos = (tcache.lengths_B + rope_delta_B)[:, None] + tree.depth_BN
    v = tg.verify_fn(target, tcache, tree.tokens_BN, tpos, tree.ancestors_BNN, cfg.impl)
    if sampling is None:
        acc = accept_greedy(tree, v.logits_BNV, cfg.tree.max_draft_tokens)
    else:
        acc = accept_sampling(key, tree, v.logits_BNV, cfg.tree.max_draft_tokens, sampling)
    return v, acc


def check_capacity(tcache: KVCache, dcache: KVCache, cfg: EngineConfig):
    """Refuse caches that cannot hold the run: each needs its longest row + max_new_tokens +
    `cfg.cache_slack` slots (a write past capacity would be clamped onto committed entries). Lengths are
    read on the host; under an outer trace only the static part (capacity >= max_new_tokens + slack) is
    checked."""
    for name, cache in (("target", tcache), ("draft", dcache)):
        try:
            longest = int(np.max(np.asarray(cache.lengths_B)))
        except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
            longest = 0
        need = longest + cfg.max_new_tokens + cfg.cache_slack
        if cache.capacity < need:
            raise ValueError(
                f"speculative_generate: {name} cache capacity {cache.capacity} is too small for this run: need "
                f"{need} = longest prompt {longest} + max_new_tokens {cfg.max_new_tokens} + slack "
                f"{cfg.cache_slack} (tree {cfg.tree}); build caches with "
                f"autoregressive.cache_capacity(prompt_len, max_new_tokens, cfg.cache_slack), as engine.prepare does")


def speculative_generate(tgraph, tparams, dgraph, dparams, tcache: KVCache, dcache: KVCache, last_logits_BV,
                         last_hidden_BD, rope_delta_B, key, *, cfg: EngineConfig, sampling=None,
                         on_emit=None, placement: Placement | None = None) -> SpecResult:
    """Generate up to cfg.max_new_tokens per row after both prefills (`prepare`); one compiled
    while_loop (`speculative_loop`). The caches are checked for room (`check_capacity`), then donated.
    `sampling`: None (greedy), SamplingParams (one for all rows or one per row) or SamplingArrays;
    changing its values reuses the compiled loop. `on_emit(tokens [B, L], counts [B])`: an optional
    host hook called as tokens are committed (streaming; a device->host transfer per round).
    `placement`: run tensor-parallel on its mesh (`sharded_speculative_loop`); None: one device."""
    check_capacity(tcache, dcache, cfg)
    sampling = as_sampling(sampling, last_logits_BV.shape[0])
    with streaming.hooked(on_emit) as emit_id:
        if placement is None:
            return speculative_loop(tgraph, tparams, dgraph, dparams, tcache, dcache, last_logits_BV, last_hidden_BD,
                                    rope_delta_B, key, sampling, emit_id, cfg=cfg)
        placement.check_rows(last_logits_BV.shape[0])
        loop, ins = sharded_speculative_loop(tgraph, dgraph, cfg, placement)
        return loop(*put((tparams, dparams, tcache, dcache, last_logits_BV, last_hidden_BD, rope_delta_B, key,
                          sampling, emit_id), ins))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoopState:
    """What `speculative_loop`'s while_loop carries from round to round (W = max_new_tokens + block)."""

    tcache: KVCache
    dcache: KVCache
    out_BW: jax.Array  # emitted tokens, row b valid up to n_out_B[b] (a round may write up to a block past M)
    n_out_B: jax.Array
    done_B: jax.Array
    pend_tok_BL: jax.Array  # the draft's pending inputs: accepted path + bonus (see the module docstring)
    pend_h_BLD: jax.Array
    pend_n_B: jax.Array
    accepted_BM: jax.Array  # per round: tokens emitted (SpecResult.accepted_BR)
    cut_BM: jax.Array
    r: jax.Array  # rounds run
    key: jax.Array


@graph_jit(graphs=("tgraph", "dgraph"), static_argnames=("tgraph", "dgraph", "cfg"), donate_argnames=("tcache", "dcache"))
def speculative_loop(tgraph, tparams, dgraph, dparams, tcache: KVCache, dcache: KVCache, last_logits_BV,
                     last_hidden_BD, rope_delta_B, key, sampling: SamplingArrays | None = None, emit_id=None, *,
                     cfg: EngineConfig) -> SpecResult:
    """The jitted loop behind `speculative_generate`; it trusts the caches to have room (no check)."""
    target, draft = nnx.merge(tgraph, tparams), nnx.merge(dgraph, dparams)
    B = last_logits_BV.shape[0]
    M, L = cfg.max_new_tokens, cfg.block
    arL = jnp.arange(L)
    key, k0 = jax.random.split(key)
    r0 = select_tokens(k0, last_logits_BV, sampling)
    streaming.emit(emit_id, r0[:, None], jnp.ones((B,), jnp.int32))
    init = LoopState(
        tcache=tcache, dcache=dcache,
        out_BW=jnp.zeros((B, M + L), jnp.int32).at[:, 0].set(r0), n_out_B=jnp.ones((B,), jnp.int32),
        done_B=_is_eos(r0, cfg.eos_ids) | (M <= 1),
        pend_tok_BL=jnp.zeros((B, L), jnp.int32).at[:, 0].set(r0),
        pend_h_BLD=jnp.zeros((B, L, last_hidden_BD.shape[-1]), last_hidden_BD.dtype).at[:, 0].set(last_hidden_BD),
        pend_n_B=jnp.ones((B,), jnp.int32),
        accepted_BM=jnp.zeros((B, M), jnp.int32), cut_BM=jnp.zeros((B, M), bool), r=jnp.int32(0), key=key,
    )

    def cond(s: LoopState):
        return (s.r < M) & ~jnp.all(s.done_B)

    def body(s: LoopState) -> LoopState:
        active = ~s.done_B
        dcache, tree = draft_phase(target, draft, s.dcache, s.pend_tok_BL, s.pend_h_BLD, s.pend_n_B, active, cfg)
        key, k_acc = jax.random.split(s.key)
        v, acc = verify_phase(target, s.tcache, tree, rope_delta_B, k_acc, cfg, sampling)
        n = acc.num_accepted_B
        tcache = commit(s.tcache, v.block_kv, acc.path_BL, jnp.where(active, n, 0))
        # Emitted this round: accepted drafts (path[1:n]) then the bonus token.
        path_tok = jnp.take_along_axis(tree.tokens_BN, acc.path_BL, 1)
        emit = jnp.where(arL[None] < (n - 1)[:, None], jnp.roll(path_tok, -1, axis=1), acc.bonus_B[:, None])
        eos_hit = _is_eos(emit, cfg.eos_ids) & (arL[None] < n[:, None])
        count = jnp.where(eos_hit.any(-1), jnp.argmax(eos_hit, -1) + 1, n)
        count = jnp.where(active, jnp.minimum(count, M - s.n_out_B), 0)
        streaming.emit(emit_id, emit, count)
        out = jax.vmap(lambda o, e, at: jax.lax.dynamic_update_slice(o, e, (at,)))(s.out_BW, emit, s.n_out_B)
        out = jnp.where(active[:, None], out, s.out_BW)
        n_out = s.n_out_B + count
        done = s.done_B | (active & (eos_hit & (arL[None] < count[:, None])).any(-1)) | (n_out >= M)
        return dataclasses.replace(
            s, tcache=tcache, dcache=dcache, out_BW=out, n_out_B=n_out, done_B=done,
            pend_tok_BL=jnp.where(active[:, None], emit, s.pend_tok_BL),
            pend_h_BLD=jnp.where(active[:, None, None], _take(v.hidden_BND, acc.path_BL), s.pend_h_BLD),
            pend_n_B=jnp.where(active, n, s.pend_n_B),
            # What was emitted, not what was verified: tokens past EOS / max_new_tokens do not count.
            accepted_BM=s.accepted_BM.at[:, s.r].set(count), cut_BM=s.cut_BM.at[:, s.r].set(active & (count < n)),
            r=s.r + 1, key=key,
        )

    s = jax.lax.while_loop(cond, body, init)
    return SpecResult(s.out_BW[:, :M], s.n_out_B, s.accepted_BM, s.cut_BM, s.r, s.tcache, s.dcache)


@functools.lru_cache(maxsize=32)
def sharded_speculative_loop(tgraph, dgraph, cfg: EngineConfig, placement: Placement):
    """`speculative_loop` on `placement`'s mesh, still one jitted call: target parameters from their
    declared axes, the draft replicated, caches split by row (and the target's by KV head), row arrays
    by row; both caches donated. (jitted fn of the loop's arguments after the graphs, in_shardings)."""
    rows, rep, tc, dc = placement.rows, placement.replicated, placement.target_cache, placement.draft_cache
    # tparams, dparams, tcache, dcache, last_logits, last_hidden, rope_delta, key, sampling, emit_id
    ins = (placement.target_params, rep, tc, dc, rows, rows, rows, rep, rows, rep)

    def loop(tparams, dparams, tcache, dcache, last_logits_BV, last_hidden_BD, rope_delta_B, key, sampling, emit_id):
        return speculative_loop(tgraph, tparams, dgraph, dparams, tcache, dcache, last_logits_BV, last_hidden_BD,
                                rope_delta_B, key, sampling, emit_id, cfg=cfg)
    return jax.jit(loop, in_shardings=ins, out_shardings=SpecResult(rows, rows, rows, rows, rep, tc, dc),
                   donate_argnums=(2, 3)), ins


# ----------------------------------------------------------------------------------- host wrapper


@dataclasses.dataclass
class Prepared:
    """Everything one batch needs before the loop: target + draft prefill results."""

    pre: tg.PrefillOutput
    dcache: KVCache
    batch: tg.PrefillBatch
    layout: DraftLayout | None = None
    draft_out_BPD: jax.Array | None = None  # the draft's outputs at its prompt items (prepare(draft_outputs=True))


def prepare(target_model, draft_model, prompts, cfg: EngineConfig, *, mode: str = "text_only",
            keep_fraction: float | None = None, prune_by: str | None = None, m_star: int | None = None,
            prepare_batch=None, allow_view_mismatch: bool = False, draft_outputs: bool = False,
            placement: Placement | None = None, split=None) -> Prepared:
    """Host: build the padded batch for `mode`, run the target prefill and the draft prefill.

    `mode` runs a visual view (views.MODE_VIEW); a draft trained for another view
    (`draft.cfg.visual_view`) is refused (views.ViewMismatchError) unless `allow_view_mismatch`.
    m*, and for pruned_visual the kept fraction and rule ("uniform": evenly spaced; "attention": most
    attended by the last prompt token at layer m*), default to what the draft was trained with.
    `split`: the models' ((tgraph, tparams), (dgraph, dparams)) when the caller keeps them (a fresh
    `nnx.split` per call costs the host a split and a GraphDef hash, ~3 ms for the tiny target)."""
    dcfg = draft_model.cfg
    view = views.check_draft_view(dcfg.visual_view, mode, allow_mismatch=allow_view_mismatch)
    keep_fraction = dcfg.visual_keep_fraction if keep_fraction is None else keep_fraction
    prune_by = dcfg.visual_prune_by if prune_by is None else prune_by
    views.check_prune(keep_fraction, prune_by)
    if cfg.tree.top_k > target_model.cfg.text.vocab_size:
        raise ValueError(f"tree {cfg.tree}: top_k {cfg.tree.top_k} exceeds the vocabulary ({target_model.cfg.text.vocab_size})")
    tcfg = target_model.cfg
    if m_star is None:
        m_star = dcfg.m_star if dcfg.m_star is not None else tg.default_m_star(tcfg.num_layers)
    batch = (prepare_batch or registry.prepare_batch_for(tcfg))(prompts, tcfg)
    T = batch.input_ids_BT.shape[1]
    tg.check_context(batch, tcfg.text, cfg.max_new_tokens)
    lay = draft_layout(prompts, view, keep_fraction=keep_fraction, prune_by=prune_by)
    batch = dataclasses.replace(batch, draft_idx_BP=lay.idx_BP, draft_len_B=lay.len_B, draft_keep_vis_B=lay.keep_vis_B,
                                draft_by_attention=lay.by_attention, draft_visual_state=views.visual_state(view))
    (tgraph, tparams), (dgraph, dparams) = split or (nnx.split(target_model), nnx.split(draft_model))
    pre = tg.prefill(tgraph, tparams, batch, capacity=cache_capacity(T, cfg.max_new_tokens, cfg.cache_slack),
                     m_star=m_star, impl=cfg.impl, placement=placement)
    items = (pre.draft_e_BPD, pre.draft_hprev_BPD, pre.draft_text_BP, lay.pos_BP, lay.len_B, lay.next_pos_B)
    dstatic = dict(capacity=cache_capacity(lay.idx_BP.shape[1], cfg.max_new_tokens, cfg.cache_slack), impl=cfg.impl,
                   outputs=draft_outputs)
    if placement is None:
        out = draft_prefill(dgraph, dparams, *items, **dstatic)
    else:
        fn, ins = sharded_draft_prefill(dgraph, placement, **dstatic)
        out = fn(*put((dparams, *items), ins))
    dcache, h_BPD = out if draft_outputs else (out, None)
    return Prepared(pre, dcache, batch, lay, h_BPD)


def generate(target_model, draft_model, prompts, cfg: EngineConfig, *, sampling=None, mode: str = "text_only",
             seed: int = 0, keep_fraction: float | None = None, prune_by: str | None = None, prepare_batch=None,
             allow_view_mismatch: bool = False):
    """prompts -> (list of token lists, SpecResult). Convenience for tests and scripts; `sampling` as
    in `speculative_generate`."""
    p = prepare(target_model, draft_model, prompts, cfg, mode=mode, keep_fraction=keep_fraction, prune_by=prune_by,
                prepare_batch=prepare_batch, allow_view_mismatch=allow_view_mismatch)
    tgraph, tparams = nnx.split(target_model)
    dgraph, dparams = nnx.split(draft_model)
    res = speculative_generate(tgraph, tparams, dgraph, dparams, p.pre.cache, p.dcache, p.pre.last_logits_BV,
                               p.pre.last_hidden_BD, p.pre.rope_delta_B, jax.random.key(seed), cfg=cfg,
                               sampling=sampling)
    toks, n = np.asarray(res.tokens_BM), np.asarray(res.num_tokens_B)
    return [toks[b, :n[b]].tolist() for b in range(len(prompts))], res


def profile_phases(target_model, draft_model, prepared: Prepared, cfg: EngineConfig, repeats: int = 5,
                   sampling=None) -> dict:
    """Median wall time (s) of one round's draft phase and verify phase, each jitted alone on the state
    right after prefill — the per-round split the fused loop cannot report."""
    tgraph, tparams = nnx.split(target_model)
    dgraph, dparams = nnx.split(draft_model)
    B = prepared.pre.last_logits_BV.shape[0]
    L = cfg.block
    r0 = jnp.argmax(prepared.pre.last_logits_BV, -1).astype(jnp.int32)
    pend_tok = jnp.zeros((B, L), jnp.int32).at[:, 0].set(r0)
    pend_h = jnp.zeros((B, L, prepared.pre.last_hidden_BD.shape[-1]), prepared.pre.last_hidden_BD.dtype)
    pend_h = pend_h.at[:, 0].set(prepared.pre.last_hidden_BD)
    pend_n, active = jnp.ones((B,), jnp.int32), jnp.ones((B,), bool)
    sampling = as_sampling(sampling, B)

    @jax.jit
    def draft_only(tp, dp, dcache):
        return draft_phase(nnx.merge(tgraph, tp), nnx.merge(dgraph, dp), dcache, pend_tok, pend_h, pend_n, active, cfg)

    @jax.jit
    def verify_only(tp, tcache, tree, key):
        return verify_phase(nnx.merge(tgraph, tp), tcache, tree, prepared.pre.rope_delta_B, key, cfg, sampling)

    def timed(fn, *args):
        jax.block_until_ready(fn(*args))
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = jax.block_until_ready(fn(*args))
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts)), out

    draft_s, (_, tree) = timed(draft_only, tparams, dparams, prepared.dcache)
    verify_s, _ = timed(verify_only, tparams, prepared.pre.cache, tree, jax.random.key(0))
    return {"draft_s_per_round": draft_s, "verify_s_per_round": verify_s}

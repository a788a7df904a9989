"""The target speculation API, family-agnostic: `prefill`, `verify`, `commit`.

Pure functions of (graphdef, params, explicit pytrees), jitted with static shapes. A family's module
is reached only through its hooks (`family.TargetModel`): `embed`, `rope`, `decoder` (the decoder stack
returning final-norm hidden, new K/V, captured hidden states), `layer_queries`, `logits`, and the
visual encoders `encode_visuals` / `visual_chunks` / `encode_chunk` / `combine_chunks`.

Batch/padding scheme: B rows, right-padded to a bucketed length T (`SEQ_BUCKET`); `lengths_B` holds
each row's true prompt length. Positions are always 3 streams [3, B, T] (M-RoPE t/h/w; 1-D models use
equal streams). The visuals of the batch are encoded in row-major appearance order and scattered to
their pad tokens through `visual_dest` (flat b*T + t indices). `prefill` runs the vision tower in chunks
of at most `VISION_CHUNK_PATCHES` patches (whole frame groups / tiles, which the towers treat
independently), moving host pixels to the device chunk by chunk, so a long video's prefill memory grows
with the LM's sequence, not with the tower's activations over every patch.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from sparrow_jax.models import attention as attn_lib
from sparrow_jax.models.attention import XLA, AttentionImpl
from sparrow_jax.models.kv_cache import KVCache, commit as _commit_cache, write_rows
from sparrow_jax.runtime import graph_jit

SEQ_BUCKET = 64  # prompt lengths, text-position and visual-position counts are padded to this multiple
VISION_CHUNK_PATCHES = 16384  # vision-tower patches per call in `prefill` (one compile per chunk shape)


def bucket(n: int, multiple: int = SEQ_BUCKET) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def pad_index_rows(rows) -> tuple[np.ndarray, np.ndarray]:
    """Per-row index lists -> ([B, bucketed L] int32 right-padded with 0, [B] lengths): the draft's text /
    visual position tables every family's batch builder lays out."""
    L = bucket(max(max((len(r) for r in rows), default=0), 1))
    out = np.zeros((len(rows), L), np.int32)
    for b, r in enumerate(rows):
        out[b, :len(r)] = r
    return out, np.asarray([len(r) for r in rows], np.int32)


def default_m_star(num_layers: int) -> int:
    """Default bridge layer m* (IVSB's layer-m* visual states; `capture` index i = output of decoder
    layer i, HF `hidden_states[i]`). The released Sparrow code reads `hidden_states[-14]` of the 28-layer
    7B targets = index 15, one past the middle; we keep that rule (num_layers // 2 + 1) for every depth,
    clamped inside the stack (1 <= m* <= num_layers - 1)."""
    if num_layers < 2:
        raise ValueError(f"default_m_star: a target with {num_layers} decoder layer(s) has no layer inside the stack")
    return max(1, min(num_layers // 2 + 1, num_layers - 1))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PrefillBatch:
    input_ids_BT: jax.Array
    lengths_B: jax.Array
    positions_3BT: jax.Array
    rope_delta_B: jax.Array  # decode position of cache slot i is i + rope_delta (all 3 streams)
    text_idx_BL: jax.Array  # positions of text tokens (compacted, right-padded with 0)
    text_len_B: jax.Array
    vis_idx_BM: jax.Array  # positions of visual tokens
    vis_len_B: jax.Array
    pixels_PC: jax.Array | None = None  # all visuals' flattened patches, concatenated (host or device)
    vision_layout: object | None = None  # family-specific pytree (e.g. qwen2_5_vl.batching.VisionLayout)
    visual_dest: jax.Array | None = None  # [num visual tokens] flat index b*T + t
    visual_feats_MD: jax.Array | None = None  # the visuals' encodings, when already computed (then no pixels)
    draft_idx_BP: jax.Array | None = None  # positions of the draft's items (its visual view), right-padded
    draft_len_B: jax.Array | None = None
    # pruned view by attention: keep this many visual positions per row, chosen on device by the
    # last prompt token's attention at layer m* (draft_idx_BP is then only a shape placeholder).
    draft_keep_vis_B: jax.Array | None = None
    draft_by_attention: bool = dataclasses.field(default=False, metadata=dict(static=True))
    # what the draft's visual items carry (views.visual_state): "mid" (layer-m* state), "embed" (input
    # embedding of the visual token) or None (the view has no visual items)
    draft_visual_state: str | None = dataclasses.field(default=None, metadata=dict(static=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PrefillOutput:
    cache: KVCache
    last_logits_BV: jax.Array  # logits at each row's last prompt position
    rope_delta_B: jax.Array
    last_hidden_BD: jax.Array  # final-norm hidden at each row's last prompt position (h_{T-1})
    # Only with prefill(states=True) (analysis, tests; nothing in decoding reads them):
    text_hidden_BLD: jax.Array | None = None  # final-norm hidden states at the text positions
    vis_hidden_mid_BMD: jax.Array | None = None  # hidden states of the visual positions after layer m*
    # The draft's items (with batch.draft_idx_BP):
    draft_e_BPD: jax.Array | None = None  # text item: token embedding e_t; visual item: the view's visual state
    draft_hprev_BPD: jax.Array | None = None  # final-norm hidden at draft_idx - 1 (items start at t = 1)
    draft_idx_BP: jax.Array | None = None  # the positions actually used (chosen on device when pruning by attention)
    draft_text_BP: jax.Array | None = None  # bool: the item is a text position (HSR input through the FC)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VerifyOutput:
    logits_BNV: jax.Array
    hidden_BND: jax.Array  # final-norm hidden states of the block tokens
    block_kv: tuple  # per layer (k [B, N, K, E], v [B, N, K, E]) for `commit`


class ContextLengthError(ValueError):
    """A prompt (plus the tokens to generate) that does not fit the target's context."""


def check_context(batch: PrefillBatch, text_cfg, max_new_tokens: int) -> None:
    """Host: refuse rows whose last decode position would pass `max_position_embeddings`."""
    lengths = np.asarray(batch.lengths_B)
    last = lengths - 1 + np.asarray(batch.rope_delta_B) + max_new_tokens
    limit = text_cfg.max_position_embeddings
    for b in np.nonzero(last >= limit)[0]:
        raise ContextLengthError(
            f"prompt {b}: {lengths[b]} prompt tokens + {max_new_tokens} new tokens reach position {last[b]}, "
            f"over the target's context of {limit} positions (max_position_embeddings)")


def _input_embeddings(model, batch: PrefillBatch, impl, visual_feats=None):
    x_BTD = model.embed(batch.input_ids_BT)
    visual_feats = batch.visual_feats_MD if visual_feats is None else visual_feats
    if batch.pixels_PC is not None or visual_feats is not None:
        B, T, D = x_BTD.shape
        if visual_feats is None:
            visual_feats = model.encode_visuals(batch.pixels_PC, batch.vision_layout, impl)
        feats = visual_feats.astype(x_BTD.dtype)
        x_BTD = x_BTD.reshape(B * T, D).at[batch.visual_dest].set(feats).reshape(B, T, D)
    return x_BTD


def forward(model, batch: PrefillBatch, *, impl: AttentionImpl = XLA, capture=(), key_visible_LBS=None,
            visual_feats=None):
    """Full-sequence forward (prefill math): final-norm hidden [B, T, D], new K/V per layer, and the
    captured intermediate hidden states. key_visible_LBS [layers, B, T]: see `visual_key_visibility`.
    visual_feats: the visuals' encodings when the caller already has them (target training)."""
    x_BTD = _input_embeddings(model, batch, impl, visual_feats)
    cos, sin = model.rope(batch.positions_3BT)
    mask = attn_lib.MaskSpec(kv_len_B=batch.lengths_B, causal=True)
    return model.decoder(x_BTD, cos, sin, mask, impl=impl, capture=capture, key_visible_LBS=key_visible_LBS)


def _gather_rows(x_BTD, idx_BL):
    return jnp.take_along_axis(x_BTD, idx_BL[:, :, None], axis=1)


def hidden_before(h_BTD, idx_BP):
    """h_{t-1} for items at positions t >= 1 (the draft's HSR pairing; padding entries read row 0)."""
    return _gather_rows(h_BTD, jnp.maximum(idx_BP - 1, 0))


def visual_mask(batch: PrefillBatch):
    """[B, T] bool: the position holds a visual token."""
    B, T = batch.input_ids_BT.shape
    valid = jnp.arange(batch.vis_idx_BM.shape[1])[None] < batch.vis_len_B[:, None]
    return jnp.zeros((B, T), bool).at[jnp.arange(B)[:, None], batch.vis_idx_BM].max(valid)


def visual_key_visibility(batch: PrefillBatch, from_layer, num_layers: int, size: int | None = None):
    """Visual-KV removal from decoder layer `from_layer` on (0-based; num_layers = none removed, 0 =
    everywhere): per-layer key visibility [num_layers, B, size] (size >= T: the cache capacity, the
    slots past the prompt are text) for `forward` / `prefill` / `verify_fn`'s key_visible_LBS. The
    internalization study only. Hiding the keys from every query equals hiding them from the text
    queries alone for every text position: a visual state at a layer >= from_layer feeds only visual
    keys of later layers, which are hidden too. `from_layer` may be traced (one compile for all)."""
    vis_BT = visual_mask(batch)
    B, T = vis_BT.shape
    size = T if size is None else size
    assert size >= T, (size, T)
    vis_BS = jnp.pad(vis_BT, ((0, 0), (0, size - T)))
    removed_L = jnp.arange(num_layers) >= from_layer
    return ~(removed_L[:, None, None] & vis_BS[None])


def last_token_attention(model, batch: PrefillBatch, x_in_BTD, k_BTKE, layer: int):
    """Attention of each row's last prompt token over the prompt at decoder layer `layer` (input
    hidden x_in, roped keys k), averaged over heads: [B, T], zero past each row's length."""
    B, T, _ = x_in_BTD.shape
    last = (batch.lengths_B - 1)[:, None]
    pos = jnp.take_along_axis(batch.positions_3BT, last[None], axis=2)
    cos, sin = model.rope(pos)
    q = model.layer_queries(layer, _gather_rows(x_in_BTD, last), cos, sin)[:, 0]  # [B, H, E]
    K, E = k_BTKE.shape[2], q.shape[-1]
    s = jnp.einsum("bkge,btke->bkgt", q.reshape(B, K, -1, E), k_BTKE,
                   preferred_element_type=jnp.float32) / jnp.sqrt(E).astype(jnp.float32)
    valid = jnp.arange(T)[None, None, None] < batch.lengths_B[:, None, None, None]
    p = jax.nn.softmax(jnp.where(valid, s, -jnp.inf), axis=-1)
    return p.mean(axis=(1, 2))


def _attention_pruned_idx(batch: PrefillBatch, score_BT, P: int):
    """The pruned view's items: text positions plus each row's `draft_keep_vis_B` most-attended visual
    positions, in order, from t = 1 (views.sequence_layout with views.kept_visual's ranking)."""
    B, T = score_BT.shape
    t = jnp.arange(T)[None]
    valid = (t < batch.lengths_B[:, None]) & (t >= 1)
    is_vis = visual_mask(batch)
    vis_score = jnp.where(is_vis & valid, score_BT, -jnp.inf)
    rank = jnp.argsort(jnp.argsort(-vis_score, axis=-1, stable=True), axis=-1)
    keep = (valid & ~is_vis) | (is_vis & valid & (rank < batch.draft_keep_vis_B[:, None]))
    order = jnp.argsort(jnp.where(keep, t, T + t), axis=-1)[:, :P]
    return order.astype(jnp.int32)


@graph_jit(graphs=("graphdef",), static_argnames=("graphdef", "impl"))
def _encode_chunk(graphdef, params, pixels, layout, impl: AttentionImpl):
    return nnx.merge(graphdef, params).encode_chunk(pixels, layout, impl)


def encode_visuals_chunked(graphdef, params, pixels_PC, layout, *, impl: AttentionImpl = XLA,
                           chunk_patches: int = VISION_CHUNK_PATCHES):
    """Host loop: the batch's visual tokens [M, D] as `model.encode_visuals(pixels_PC, layout)` gives them,
    from tower calls of at most ~`chunk_patches` patches each (the family's `visual_chunks` plan: whole
    frame groups / tiles, the last chunk padded; one compile per chunk shape). Each chunk's pixels go to
    the device only when its call is dispatched, and at most two calls are in flight, so host pixels
    are never copied whole and the tower's activations are those of one chunk."""
    model = nnx.merge(graphdef, params)
    parts, pending = [], None
    for pixels, chunk_layout, valid in model.visual_chunks(pixels_PC, layout, chunk_patches):
        out = _encode_chunk(graphdef, params, jnp.asarray(pixels), chunk_layout, impl)
        if pending is not None:
            pending.block_until_ready()  # bound the work queued behind async dispatch
        parts.append(out[:valid])
        pending = out
    feats = parts[0] if len(parts) == 1 else jnp.concatenate(parts)
    return model.combine_chunks(feats, layout)


def prefill(graphdef, params, batch: PrefillBatch, *, capacity: int, m_star: int, impl: AttentionImpl = XLA,
            states: bool = False, key_visible_LBS=None,
            vision_chunk_patches: int | None = VISION_CHUNK_PATCHES, placement=None) -> PrefillOutput:
    """Run the target on the whole prompt (video included). `capacity` is the cache length S, which
    must cover prompt + generated tokens + one verify block. Only what is asked for leaves the call:
    the draft's items when `batch.draft_idx_BP` is set (layer-m* states only for a view or pruning
    rule that reads them), the all-position text / layer-m* visual states only with `states=True`.
    key_visible_LBS [layers, B, T]: the internalization study's visual-KV removal (`visual_key_visibility`).
    The visuals are encoded first, in chunks of `vision_chunk_patches` (`encode_visuals_chunked`); None
    runs the tower over every patch inside the one jitted call (the reference path).
    `placement` (decoding.placement.Placement): run on its mesh (`sharded_prefill`; the tower's chunks
    follow the placed parameters); None: one device."""
    pixels = batch.pixels_PC
    if vision_chunk_patches and pixels is not None and not isinstance(pixels, jax.core.Tracer):
        feats = encode_visuals_chunked(graphdef, params, pixels, batch.vision_layout, impl=impl,
                                       chunk_patches=vision_chunk_patches)
        batch = dataclasses.replace(batch, pixels_PC=None, vision_layout=None, visual_feats_MD=feats)
    static = dict(capacity=capacity, m_star=m_star, impl=impl, states=states)
    if placement is None:
        return _prefill(graphdef, params, batch, key_visible_LBS=key_visible_LBS, **static)
    placement.check_rows(batch.input_ids_BT.shape[0])
    fn, ins = sharded_prefill(graphdef, placement, batch.draft_by_attention, batch.draft_visual_state, **static)
    return fn(*placement.put((params, batch, key_visible_LBS), ins))


@functools.lru_cache(maxsize=32)
def sharded_prefill(graphdef, placement, draft_by_attention: bool, draft_visual_state, *, capacity: int, m_star: int,
                    impl: AttentionImpl = XLA, states: bool = False):
    """`_prefill` on `placement`'s mesh: parameters from their declared axes, the batch's row arrays by
    row (positions [3, B, T] on their second axis; the flat visual arrays whole), the outputs by row and
    the cache by row and KV head. The batch's static fields shape its sharding tree, hence the key.
    (jitted fn of (params, batch, key_visible_LBS), in_shardings)."""
    rows, rep = placement.rows, placement.replicated
    by_row = placement.named(P(None, *rows.spec))
    batch_s = PrefillBatch(
        input_ids_BT=rows, lengths_B=rows, positions_3BT=by_row, rope_delta_B=rows, text_idx_BL=rows, text_len_B=rows,
        vis_idx_BM=rows, vis_len_B=rows, pixels_PC=rep, vision_layout=rep, visual_dest=rep, visual_feats_MD=rep,
        draft_idx_BP=rows, draft_len_B=rows, draft_keep_vis_B=rows, draft_by_attention=draft_by_attention,
        draft_visual_state=draft_visual_state)
    ins = (placement.target_params, batch_s, by_row)
    outs = PrefillOutput(placement.target_cache, *(rows,) * 9)

    def fn(params, batch, key_visible_LBS):
        return _prefill(graphdef, params, batch, key_visible_LBS=key_visible_LBS, capacity=capacity, m_star=m_star,
                        impl=impl, states=states)
    return jax.jit(fn, in_shardings=ins, out_shardings=outs), ins


def lower_prefill(graphdef, params, batch: PrefillBatch, *, capacity: int, m_star: int, impl: AttentionImpl = XLA,
                  states: bool = False, key_visible_LBS=None,
                  vision_chunk_patches: int | None = VISION_CHUNK_PATCHES) -> list:
    """The programs `prefill` runs for `batch` with the same arguments, lowered (not run): the vision
    tower's, one per chunk, then the LM's — e.g. for the attention routes they take
    (`pallas_kernels.dispatch.routes_in`)."""
    pixels = batch.pixels_PC
    if not (vision_chunk_patches and pixels is not None):
        return [_prefill.lower(graphdef, params, batch, capacity=capacity, m_star=m_star, impl=impl, states=states,
                               key_visible_LBS=key_visible_LBS)]
    model = nnx.merge(graphdef, params)
    programs, rows = [], 0
    for chunk, chunk_layout, valid in model.visual_chunks(pixels, batch.vision_layout, vision_chunk_patches):
        programs.append(_encode_chunk.lower(graphdef, params, jnp.asarray(chunk), chunk_layout, impl))
        rows += valid
    out = programs[0].out_info  # every chunk's rows have the same width and dtype
    feats = jax.eval_shape(lambda f: model.combine_chunks(f, batch.vision_layout),
                           jax.ShapeDtypeStruct((rows,) + out.shape[1:], out.dtype))
    batch = dataclasses.replace(batch, pixels_PC=None, vision_layout=None, visual_feats_MD=feats)
    return programs + [_prefill.lower(graphdef, params, batch, capacity=capacity, m_star=m_star, impl=impl,
                                      states=states, key_visible_LBS=key_visible_LBS)]


@graph_jit(graphs=("graphdef",), static_argnames=("graphdef", "capacity", "m_star", "impl", "states"))
def _prefill(graphdef, params, batch: PrefillBatch, *, capacity: int, m_star: int, impl: AttentionImpl = XLA,
             states: bool = False, key_visible_LBS=None) -> PrefillOutput:
    model = nnx.merge(graphdef, params)
    B, T = batch.input_ids_BT.shape
    assert capacity >= T, (capacity, T)
    with_draft = batch.draft_idx_BP is not None
    assert 0 < m_star < model.cfg.num_layers, f"m_star {m_star} must be inside the decoder stack"
    need_mid = states or (with_draft and (batch.draft_by_attention or batch.draft_visual_state == "mid"))
    capture = ((m_star,) if need_mid else ()) + ((0,) if with_draft else ())
    h_BTD, kvs, captured = forward(model, batch, impl=impl, capture=capture, key_visible_LBS=key_visible_LBS)
    cfg = model.cfg.text
    cache = KVCache.empty(len(kvs), B, capacity, cfg.num_key_value_heads, cfg.head_dim, h_BTD.dtype)
    zeros_B = jnp.zeros((B,), jnp.int32)
    cache = KVCache(tuple(write_rows(c, k, zeros_B) for c, (k, _) in zip(cache.k, kvs)),
                    tuple(write_rows(c, v, zeros_B) for c, (_, v) in zip(cache.v, kvs)), batch.lengths_B)
    last_BD = _gather_rows(h_BTD, (batch.lengths_B - 1)[:, None])[:, 0]
    draft = {}
    if with_draft:
        idx = batch.draft_idx_BP
        if batch.draft_by_attention:
            score = last_token_attention(model, batch, captured[m_star], kvs[m_star][0], m_star)
            idx = _attention_pruned_idx(batch, score, idx.shape[1])
        is_text = ~_gather_rows(visual_mask(batch)[..., None], idx)[..., 0]
        e = _gather_rows(captured[0], idx)
        if batch.draft_visual_state == "mid":  # ivsb_mid: visual items carry the layer-m* state
            e = jnp.where(is_text[..., None], e, _gather_rows(captured[m_star], idx))
        draft = dict(draft_e_BPD=e, draft_hprev_BPD=hidden_before(h_BTD, idx), draft_idx_BP=idx,
                     draft_text_BP=is_text)
    if states:
        draft.update(text_hidden_BLD=_gather_rows(h_BTD, batch.text_idx_BL),
                     vis_hidden_mid_BMD=_gather_rows(captured[m_star], batch.vis_idx_BM))
    return PrefillOutput(cache=cache, last_logits_BV=model.logits(last_BD).astype(jnp.float32),
                         rope_delta_B=batch.rope_delta_B, last_hidden_BD=last_BD, **draft)


def verify_fn(model, cache: KVCache, tokens_BN, positions_BN, tree_mask_BNN, impl: AttentionImpl = XLA,
              key_visible_LBS=None) -> VerifyOutput:
    """Un-jitted verify, for composition inside larger jitted loops (the engine, AR generation).
    key_visible_LBS [layers, B, S]: per-layer visibility of the cache's keys (`visual_key_visibility`)."""
    x_BND = model.embed(tokens_BN)
    if tree_mask_BNN.ndim == 2:
        tree_mask_BNN = jnp.broadcast_to(tree_mask_BNN, (tokens_BN.shape[0],) + tree_mask_BNN.shape)
    pos_3BN = jnp.broadcast_to(positions_BN[None], (3,) + positions_BN.shape)
    cos, sin = model.rope(pos_3BN)
    mask = attn_lib.MaskSpec(kv_len_B=cache.lengths_B, block_mask_BTN=tree_mask_BNN.astype(bool))
    h_BND, kvs, _ = model.decoder(x_BND, cos, sin, mask, caches=list(zip(cache.k, cache.v)), impl=impl,
                                  key_visible_LBS=key_visible_LBS)
    return VerifyOutput(model.logits(h_BND).astype(jnp.float32), h_BND, kvs)


@graph_jit(graphs=("graphdef",), static_argnames=("graphdef", "impl"))
def verify(graphdef, params, cache: KVCache, tokens_BN, positions_BN, tree_mask_BNN, *,
           impl: AttentionImpl = XLA) -> VerifyOutput:
    """Target forward over N block tokens: each sees the committed cache plus its tree ancestors
    (tree_mask[b, i, j] = node j is i or an ancestor of i). positions_BN are 1-D decode positions
    (committed length + node depth + rope delta). The cache is not modified: see `commit`."""
    return verify_fn(nnx.merge(graphdef, params), cache, tokens_BN, positions_BN, tree_mask_BNN, impl)


commit = jax.jit(_commit_cache, donate_argnums=0)
commit.__doc__ = _commit_cache.__doc__

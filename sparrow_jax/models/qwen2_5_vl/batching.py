"""Qwen2.5-VL's host-side index math (numpy): the vision tower's layout (window order, rotary ids,
attention segments), its chunk plan, the M-RoPE index, and the batch builder. They depend only on token
ids and grid sizes, known before the jitted call, and fix the shapes of one compiled executable."""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from sparrow_jax.models.qwen2_5_vl.config import Qwen25VLConfig, VisionConfig
from sparrow_jax.models.target import PrefillBatch, bucket, pad_index_rows


# ------------------------------------------------------------------------------ host-side layouts


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SegmentLayout:
    """Contiguous attention segments gathered into a padded [n_seg, L] block (the segments become the
    batch axis of `attention`), and each token's slot in that block for the way back."""

    gather_idx: jax.Array  # [n_seg, L] token index (0 where padded)
    seg_len: jax.Array  # [n_seg]
    token_slot: jax.Array  # [n_tokens] = seg * L + offset


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VisionLayout:
    """Everything the vision tower needs besides pixels, for a fixed list of grids."""

    patch_perm: jax.Array  # [P] window order of patches (merge units stay together)
    rot_pos: jax.Array  # [P, 2] (h, w) rotary positions, already in window order
    full: SegmentLayout  # per-frame segments (fullatt blocks)
    window: SegmentLayout  # per-window segments (other blocks)
    merged_unperm: jax.Array  # [P / merge^2] back to raster order after the merger
    # [n_groups, 2] (h, w) patches of each frame group (temporal patch), in pixel-row order: the units
    # the tower can be run on separately (`vision_chunks`); unused inside the tower
    group_hw: jax.Array


def _segment_layout(seg_lens) -> SegmentLayout:
    seg_lens = np.asarray([s for s in seg_lens if s > 0], np.int64)
    L = int(seg_lens.max())
    starts = np.concatenate([[0], np.cumsum(seg_lens)[:-1]])
    offs = np.arange(L)
    gather = starts[:, None] + offs[None, :]
    gather = np.where(offs[None, :] < seg_lens[:, None], gather, 0)
    seg_of_tok = np.repeat(np.arange(len(seg_lens)), seg_lens)
    off_of_tok = np.arange(seg_lens.sum()) - np.repeat(starts, seg_lens)
    return SegmentLayout(jnp.asarray(gather, jnp.int32), jnp.asarray(seg_lens, jnp.int32),
                         jnp.asarray(seg_of_tok * L + off_of_tok, jnp.int32))


def vision_layout(grids_thw, vcfg: VisionConfig) -> VisionLayout:
    """Window reordering, rotary ids and attention segments for a list of (t, h, w) patch grids,
    as transformers' `get_vision_window_index` / `get_vision_position_ids` / cu_seqlens define them."""
    m = vcfg.spatial_merge_size
    unit = m * m
    win = vcfg.window_size // m // vcfg.patch_size
    window_index, win_lens, frame_lens, rot, group_hw = [], [], [], [], []
    offset = 0
    for t, h, w in grids_thw:
        lh, lw = h // m, w // m
        idx = np.arange(t * lh * lw).reshape(t, lh, lw)
        ph, pw = win - lh % win, win - lw % win
        nh, nw = (lh + ph) // win, (lw + pw) // win
        padded = np.pad(idx, ((0, 0), (0, ph), (0, pw)), constant_values=-100)
        padded = padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, win * win)
        win_lens.extend(((padded != -100).sum(-1).reshape(-1) * unit).tolist())
        flat = padded.reshape(-1)
        window_index.append(flat[flat != -100] + offset)
        offset += t * lh * lw
        frame_lens.extend([h * w] * t)
        group_hw.extend([(h, w)] * t)
        hp, wp = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        hp = hp.reshape(lh, m, lw, m).transpose(0, 2, 1, 3).reshape(-1)
        wp = wp.reshape(lh, m, lw, m).transpose(0, 2, 1, 3).reshape(-1)
        rot.append(np.tile(np.stack([hp, wp], -1), (t, 1)))
    window_index = np.concatenate(window_index)
    patch_perm = (window_index[:, None] * unit + np.arange(unit)[None]).reshape(-1)
    rot = np.concatenate(rot)[patch_perm]
    return VisionLayout(
        patch_perm=jnp.asarray(patch_perm, jnp.int32), rot_pos=jnp.asarray(rot, jnp.int32),
        full=_segment_layout(frame_lens), window=_segment_layout(win_lens),
        merged_unperm=jnp.asarray(np.argsort(window_index), jnp.int32),
        group_hw=jnp.asarray(np.asarray(group_hw, np.int32).reshape(-1, 2)),
    )


@functools.lru_cache(maxsize=64)
def chunk_layout(groups: int, h: int, w: int, vcfg: VisionConfig) -> VisionLayout:
    """The layout of `groups` frame groups of h x w patches: the same for every chunk of that shape."""
    return vision_layout([(groups, h, w)], vcfg)


def _round_groups(n: int) -> int:
    """n rounded up to a multiple of 2^(bits(n - 1) - 3): exact up to 8, then 4 sizes per doubling
    (e.g. 9 -> 10, 96 -> 96, 97 -> 112, 129 -> 160)."""
    step = 1 << max(0, (n - 1).bit_length() - 3)
    return -(-n // step) * step


def vision_chunks(group_hw, vcfg: VisionConfig, chunk_patches: int):
    """Split frame groups (temporal patches; [n, 2] their (h, w) in pixel-row order) into tower calls of
    at most ~`chunk_patches` patches. Frame groups are independent in the tower (windows and full-attention
    segments never cross one; rotary positions restart in each), so consecutive groups of one size can run
    as one (G, h, w) grid, whichever visual they come from. G is the largest group count within
    `chunk_patches` (at least 1), or for a shorter run that run rounded up to one of four sizes per doubling
    (`_round_groups`): few shapes, few compiles, under a quarter of a chunk's tower work spent on padding
    (the next power of two padded a 96-group run to 128). Returns [(first row, rows, G, h, w, valid groups)];
    a chunk with fewer valid groups than G is padded."""
    group_hw = np.asarray(group_hw).reshape(-1, 2)
    out, g, row = [], 0, 0
    while g < len(group_hw):
        h, w = (int(x) for x in group_hw[g])
        run = 1
        while g + run < len(group_hw) and tuple(group_hw[g + run]) == (h, w):
            run += 1
        most = max(1, chunk_patches // (h * w))
        for start in range(0, run, most):
            valid = min(most, run - start)
            G = most if run > most else min(most, _round_groups(valid))
            out.append((row, valid * h * w, G, h, w, valid))
            row += valid * h * w
        g += run
    return out


def chunk_dims(layout: VisionLayout) -> tuple[int, ...]:
    """A chunk layout's sizes that `pad_chunk_layout` can grow: (patches, full-attention segments and their
    longest, window segments and their longest)."""
    return (len(layout.patch_perm), *np.shape(layout.full.gather_idx), *np.shape(layout.window.gather_idx))


def _pad_segments(seg: SegmentLayout, n: int, L: int, P: int) -> SegmentLayout:
    n0, L0 = np.shape(seg.gather_idx)
    gather = np.zeros((n, L), np.int32)
    gather[:n0, :L0] = np.asarray(seg.gather_idx)
    seg_len = np.ones((n,), np.int32)  # added segments: one key (token 0), computed and never read
    seg_len[:n0] = np.asarray(seg.seg_len)
    slot = np.asarray(seg.token_slot)
    slot = np.concatenate([slot // L0 * L + slot % L0, np.zeros((P - len(slot),), slot.dtype)])  # padding reads slot 0
    return SegmentLayout(gather, seg_len, slot.astype(np.int32))


def pad_chunk_layout(pixels_PC, layout: VisionLayout, dims) -> tuple[np.ndarray, VisionLayout]:
    """Host: a chunk's pixels and layout grown to `dims` (elementwise >= `chunk_dims(layout)`) so chunks of
    different frame sizes stack into one shape. The padding patches come after the real ones in window
    order, join no real patch's attention segment and form merge units of their own, so the first
    `patches / merge^2` output rows are the unpadded chunk's (the rest are dropped by the caller)."""
    P, n_full, L_full, n_win, L_win = (int(d) for d in dims)
    P0 = len(layout.patch_perm)
    unit = P0 // len(layout.merged_unperm)
    if P % unit or any(d < d0 for d, d0 in zip(dims, chunk_dims(layout))):
        raise ValueError(f"pad_chunk_layout: dims {tuple(dims)} do not cover the chunk's {chunk_dims(layout)} "
                         f"in whole merge units of {unit} patches")
    grow = lambda x, n: np.concatenate([np.asarray(x), np.arange(len(x), n, dtype=np.int32)])  # noqa: E731
    rot = np.zeros((P, 2), np.int32)
    rot[:P0] = np.asarray(layout.rot_pos)
    pixels = np.asarray(pixels_PC)
    pixels = np.concatenate([pixels, np.zeros((P - P0, pixels.shape[1]), pixels.dtype)])
    return pixels, VisionLayout(
        patch_perm=grow(layout.patch_perm, P), rot_pos=rot, full=_pad_segments(layout.full, n_full, L_full, P),
        window=_pad_segments(layout.window, n_win, L_win, P), merged_unperm=grow(layout.merged_unperm, P // unit),
        group_hw=np.asarray(layout.group_hw))


def rope_index(input_ids, mm_token_type_ids, grids_thw, second_per_grid_ts, cfg: Qwen25VLConfig):
    """3-D M-RoPE positions [3, T] and decode delta for one unpadded row, as transformers 5.23's
    `get_rope_index`: text runs count up by 1; a visual block starts at the running position p,
    t = p + floor(i * tokens_per_second * second_per_grid_t) (images: interval 1), h/w = p + index on
    the merged grid; text after the block resumes at p + max(h, w) / merge.

    Decode delta: generated token at cache slot i sits at position i + delta with
    delta = last prompt position + 1 - T, i.e. text continues from the last prompt token. This is what
    a full forward over prompt + generated text computes and what transformers 5.23 `generate` does;
    it differs from `get_rope_index`'s own delta (max over all positions + 1 - T) when a video's
    temporal positions run past the last text position."""
    types = np.asarray(mm_token_type_ids)
    m = cfg.vision.spatial_merge_size
    grids, secs = iter(grids_thw), iter(second_per_grid_ts)
    pos, cur = [], 0
    for key, group in itertools.groupby(enumerate(types.tolist()), lambda x: x[1]):
        group = list(group)
        n = len(group)
        if key == 0:
            pos.append(np.broadcast_to(np.arange(n) + cur, (3, n)))
            cur += n
            continue
        t, h, w = next(grids)
        sec = next(secs)
        # float32 like torch: (arange(t) * (tokens_per_second * second_per_grid_t)).long()
        interval = np.float32(cfg.vision.tokens_per_second) * np.float32(sec) if key == 2 else np.float32(1)
        lt, lh, lw = t, h // m, w // m
        if lt * lh * lw != n:
            raise ValueError(f"visual block of {n} tokens does not match grid {(t, h, w)} ({lt * lh * lw} tokens)")
        tt = (np.arange(lt, dtype=np.float32) * interval).astype(np.int64)
        T_, H_, W_ = np.meshgrid(tt, np.arange(lh) + cur, np.arange(lw) + cur, indexing="ij")
        pos.append(np.stack([T_.reshape(-1) + cur, H_.reshape(-1), W_.reshape(-1)]))
        cur += max(h, w) // m
    pos = np.concatenate(pos, axis=1) if pos else np.zeros((3, 0), np.int64)
    delta = int(pos[:, -1].max()) + 1 - pos.shape[1] if pos.size else 0
    return pos.astype(np.int32), delta

# --------------------------------------------------------------------------------- batch building


def prepare_prefill_batch(prompts, cfg: Qwen25VLConfig, *, seq_bucket: int | None = None, dtype=np.float32):
    """Host-side: B prompts (objects with input_ids, mm_token_type_ids, visuals — see
    `sparrow_jax.io.vision_inputs.MultimodalPrompt`) -> a right-padded `PrefillBatch`."""
    B = len(prompts)
    if B == 0:
        raise ValueError("prepare_prefill_batch: no prompts")
    lens = [len(p.input_ids) for p in prompts]
    T = bucket(max(lens)) if seq_bucket is None else bucket(max(lens), seq_bucket)
    ids = np.zeros((B, T), np.int32)
    pos = np.zeros((3, B, T), np.int32)
    delta = np.zeros((B,), np.int32)
    text_idx, vis_idx, dest, pixels, grids = [], [], [], [], []
    for b, p in enumerate(prompts):
        n = lens[b]
        ids[b, :n] = p.input_ids
        types = np.asarray(p.mm_token_type_ids)
        if types.shape != (n,):
            raise ValueError(f"prompt {b}: mm_token_type_ids shape {types.shape} != input_ids ({n},)")
        visuals = list(p.visuals)
        row_grids = [tuple(v.grid_thw) for v in visuals]
        secs = [getattr(v, "second_per_grid_t", 1.0) for v in visuals]
        pos[:, b, :n], delta[b] = rope_index(p.input_ids, types, row_grids, secs, cfg)
        pos[:, b, n:] = pos[:, b, n - 1:n] + 1 + np.arange(T - n)  # padding positions: harmless, masked
        text_idx.append(np.nonzero(types == 0)[0])
        vis = np.nonzero(types != 0)[0]
        vis_idx.append(vis)
        dest.append(b * T + vis)
        for v in visuals:
            pixels.append(np.asarray(v.pixel_values))
            grids.append(tuple(v.grid_thw))
        want = sum(t * h * w // cfg.vision.spatial_merge_size**2 for t, h, w in row_grids)
        if want != len(vis):
            raise ValueError(f"prompt {b}: {len(vis)} visual pad tokens but its visuals give {want} features")

    text_idx_BL, text_len = pad_index_rows(text_idx)
    vis_idx_BM, vis_len = pad_index_rows(vis_idx)
    has_vis = bool(pixels)
    if has_vis:  # stays on the host (one visual: no copy): `target.prefill` moves it to the device chunk by chunk
        pixels = pixels[0].astype(dtype, copy=False) if len(pixels) == 1 else np.concatenate(pixels, dtype=dtype)
    return PrefillBatch(
        input_ids_BT=jnp.asarray(ids), lengths_B=jnp.asarray(lens, jnp.int32), positions_3BT=jnp.asarray(pos),
        rope_delta_B=jnp.asarray(delta), text_idx_BL=jnp.asarray(text_idx_BL), text_len_B=jnp.asarray(text_len),
        vis_idx_BM=jnp.asarray(vis_idx_BM), vis_len_B=jnp.asarray(vis_len),
        pixels_PC=pixels if has_vis else None,
        vision_layout=vision_layout(grids, cfg.vision) if has_vis else None,
        visual_dest=jnp.asarray(np.concatenate(dest), jnp.int32) if has_vis else None,
    )

"""LLaVA-OneVision's host-side layout math (numpy) and batch builder: how many SigLIP tiles and LM
tokens a visual takes (anyres geometry, pooled video frames), the 4-tap gather (`LlavaVisionLayout`)
that turns projected tile features into the visual tokens, and `prepare_prefill_batch`."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from sparrow_jax.models.llava_onevision.config import LlavaOneVisionConfig
from sparrow_jax.models.target import PrefillBatch, bucket, pad_index_rows


# ------------------------------------------------------------------------------ host-side layouts


def select_best_resolution(image_hw, pinpoints) -> tuple[int, int]:
    """The pinpoint (h, w) keeping the most image pixels, then wasting the fewest (HF's rule)."""
    oh, ow = image_hw
    best, best_eff, best_waste = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / ow, h / oh)
        eff = min(int(ow * scale) * int(oh * scale), ow * oh)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (h, w), eff, waste
    return best


@dataclasses.dataclass(frozen=True)
class AnyresGeometry:
    """Where an anyres image's tile features land: tiles grid (nph, npw); the feature grid
    (nph*G, npw*G) cropped to rows [r0, r1) and cols [c0, c1); resized to (out_h, out_w)."""

    nph: int
    npw: int
    r0: int
    r1: int
    c0: int
    c1: int
    out_h: int
    out_w: int

    @property
    def num_tiles(self) -> int:
        return 1 + self.nph * self.npw


def anyres_geometry(image_hw, cfg: LlavaOneVisionConfig) -> AnyresGeometry:
    """transformers' get_anyres_image_grid_shape + unpad_image + the anyres_max resize rule."""
    oh, ow = (int(x) for x in image_hw)
    if oh <= 0 or ow <= 0:
        raise ValueError(f"image size {image_hw} must be positive")
    G, S = cfg.vision.grid, cfg.vision.image_size
    bh, bw = select_best_resolution((oh, ow), cfg.image_grid_pinpoints)
    nph, npw = bh // S, bw // S
    ch, cw = nph * G, npw * G
    r0, r1, c0, c1 = 0, ch, 0, cw
    if ow / oh > cw / ch:
        new_h = int(round(oh * (cw / ow), 7))
        pad = (ch - new_h) // 2
        r0, r1 = pad, ch - pad
    else:
        new_w = int(round(ow * (ch / oh), 7))
        pad = (cw - new_w) // 2
        c0, c1 = pad, cw - pad
    h, w = r1 - r0, c1 - c0
    ratio = math.sqrt(h * w / (cfg.max_num_patches * G**2))
    out_h, out_w = (int(h // ratio), int(w // ratio)) if ratio > 1.1 else (h, w)
    return AnyresGeometry(nph, npw, r0, r1, c0, c1, out_h, out_w)


def num_tiles(kind: str, cfg: LlavaOneVisionConfig, *, image_hw=None, num_frames: int = 0, anyres: bool = True) -> int:
    """Tiles [n, C, S, S] a visual feeds to SigLIP (video: its frames)."""
    if kind == "video":
        return num_frames
    return anyres_geometry(image_hw, cfg).num_tiles if anyres else 1


def num_visual_tokens(kind: str, cfg: LlavaOneVisionConfig, *, image_hw=None, num_frames: int = 0,
                      anyres: bool = True) -> int:
    """LM placeholder tokens of one visual, as transformers' processor counts them."""
    G = cfg.vision.grid
    if kind == "video":
        return num_frames * (-(-G // 2)) ** 2 + 1
    if not anyres:
        return G * G + 1
    g = anyres_geometry(image_hw, cfg)
    return G * G + g.out_h * (g.out_w + 1)


def _bilinear_taps(n_in: int, n_out: int):
    """torch's bilinear interpolation (align_corners=False, no antialias) along one axis, in fp32:
    source indices (i0, i1) and weights (l0, l1) per output index."""
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.maximum(scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    l1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
    i1 = i0 + (i0 < n_in - 1)
    return i0, i1, (np.float32(1) - l1).astype(np.float32), l1


def _resize_taps(rows, cols, out_h: int, out_w: int):
    """4-tap (index, weight) tables [out_h*out_w, 4] resizing a grid whose cell (r, c) holds table
    row rows[r] + cols[c] (rows/cols: 1-D index arrays) to out_h x out_w, row-major."""
    hi0, hi1, hl0, hl1 = _bilinear_taps(len(rows), out_h)
    wi0, wi1, wl0, wl1 = _bilinear_taps(len(cols), out_w)
    R = lambda i: rows[i][:, None]  # noqa: E731
    C = lambda i: cols[i][None, :]  # noqa: E731
    idx = np.stack([R(hi0) + C(wi0), R(hi0) + C(wi1), R(hi1) + C(wi0), R(hi1) + C(wi1)], -1)
    w = np.stack([hl0[:, None] * wl0[None], hl0[:, None] * wl1[None], hl1[:, None] * wl0[None],
                  hl1[:, None] * wl1[None]], -1)
    return idx.reshape(-1, 4), w.reshape(-1, 4).astype(np.float32)


def _identity_taps(ids):
    ids = np.asarray(ids, np.int64)
    idx = np.zeros((len(ids), 4), np.int64)
    idx[:, 0] = ids
    w = np.zeros((len(ids), 4), np.float32)
    w[:, 0] = 1
    return idx, w


def visual_taps(kind: str, cfg: LlavaOneVisionConfig, base: int, newline: int, *, image_hw=None,
                num_frames: int = 0, anyres: bool = True):
    """(idx [m, 4], w [m, 4]) producing one visual's m LM tokens from the feature table, whose rows
    base, base + 1, ... hold this visual's tile features (tile-major, then patch row-major) and row
    `newline` holds image_newline."""
    G = cfg.vision.grid
    nl = _identity_taps([newline])
    if kind == "video":
        P = -(-G // 2)
        parts = [_resize_taps(base + f * G * G + np.arange(G) * G, np.arange(G), P, P) for f in range(num_frames)]
        parts.append(nl)
    elif not anyres:
        parts = [_identity_taps(base + np.arange(G * G)), nl]
    else:
        g = anyres_geometry(image_hw, cfg)
        r, c = np.arange(g.r0, g.r1), np.arange(g.c0, g.c1)
        # grid cell (r, c) -> tile 1 + (r // G) * npw + c // G, patch (r % G, c % G)
        rows = base + (1 + (r // G) * g.npw) * G * G + (r % G) * G
        cols = (c // G) * G * G + c % G
        idx, w = _resize_taps(rows, cols, g.out_h, g.out_w)
        idx = np.concatenate([idx.reshape(g.out_h, g.out_w, 4),
                              np.broadcast_to(nl[0].reshape(1, 1, 4), (g.out_h, 1, 4))], 1).reshape(-1, 4)
        w = np.concatenate([w.reshape(g.out_h, g.out_w, 4),
                            np.broadcast_to(nl[1].reshape(1, 1, 4), (g.out_h, 1, 4))], 1).reshape(-1, 4)
        parts = [_identity_taps(base + np.arange(G * G)), (idx, w)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LlavaVisionLayout:
    """How the batch's visual tokens are made from the tile features: token m = sum_k src_w[m, k] *
    table[src_idx[m, k]], table = [image_newline ; projected features of all tiles (tile-major,
    patch row-major)] (the newline first, so padding tiles at the end change no index)."""

    src_idx: jax.Array  # [M, 4] int32
    src_w: jax.Array  # [M, 4] float32


def _visual_info(v, cfg: LlavaOneVisionConfig):
    """(kind, keyword args for the geometry helpers) of a duck-typed visual: `kind`, `pixel_values`
    [n, C, S, S]; images also `image_size` (h, w) and optionally `anyres` (default True)."""
    pix = np.asarray(v.pixel_values)
    v_cfg = cfg.vision
    want = (v_cfg.num_channels, v_cfg.image_size, v_cfg.image_size)
    if pix.ndim != 4 or tuple(pix.shape[1:]) != want:
        raise ValueError(f"{v.kind} pixel_values shape {pix.shape}: expected [n, {want[0]}, {want[1]}, {want[2]}]")
    if v.kind == "video":
        return "video", dict(num_frames=pix.shape[0])
    if v.kind != "image":
        raise ValueError(f"visual kind {v.kind!r}: expected 'image' or 'video'")
    anyres = bool(getattr(v, "anyres", True))
    kw = dict(image_hw=tuple(int(x) for x in v.image_size), anyres=anyres)
    n = num_tiles("image", cfg, **kw)
    if pix.shape[0] != n:
        raise ValueError(f"image of size {kw['image_hw']} ({'anyres' if anyres else 'base only'}) needs {n} tiles, "
                         f"pixel_values has {pix.shape[0]}")
    return "image", kw


def vision_layout(visuals, cfg: LlavaOneVisionConfig) -> tuple[LlavaVisionLayout, list[int]]:
    """The 4-tap layout for visuals in batch order, and each visual's token count."""
    idx, w, counts, tile0 = [], [], [], 0
    for v in visuals:
        kind, kw = _visual_info(v, cfg)
        i, ww = visual_taps(kind, cfg, 1 + tile0 * cfg.vision.grid**2, 0, **kw)
        idx.append(i)
        w.append(ww)
        counts.append(len(i))
        tile0 += np.asarray(v.pixel_values).shape[0]
    return LlavaVisionLayout(jnp.asarray(np.concatenate(idx), jnp.int32), jnp.asarray(np.concatenate(w))), counts


# --------------------------------------------------------------------------------- batch building


TILE_BUCKET = 8  # the batch's SigLIP tiles are zero-padded to a multiple of this (one compile per bucket)


def prepare_prefill_batch(prompts, cfg: LlavaOneVisionConfig, *, seq_bucket: int | None = None, dtype=np.float32):
    """Host-side: B prompts (objects with input_ids, mm_token_type_ids (0 text, 1 image, 2 video) and
    visuals in prompt order — see `sparrow_jax.io.llava_inputs`) -> a right-padded `PrefillBatch`.
    Positions are 0..T-1 in all three streams (1-D RoPE), rope delta 0. Tiles are padded to
    `TILE_BUCKET`, visual tokens to `SEQ_BUCKET` (padded tokens are written nowhere)."""
    B = len(prompts)
    if B == 0:
        raise ValueError("prepare_prefill_batch: no prompts")
    lens = [len(p.input_ids) for p in prompts]
    T = bucket(max(lens)) if seq_bucket is None else bucket(max(lens), seq_bucket)
    ids = np.zeros((B, T), np.int32)
    text_idx, vis_idx, dest, visuals = [], [], [], []
    for b, p in enumerate(prompts):
        n = lens[b]
        row = np.asarray(p.input_ids)
        ids[b, :n] = row
        types = np.asarray(p.mm_token_type_ids)
        if types.shape != (n,):
            raise ValueError(f"prompt {b}: mm_token_type_ids shape {types.shape} != input_ids ({n},)")
        for code, tok, name in ((1, cfg.image_token_id, "image"), (2, cfg.video_token_id, "video")):
            if not np.array_equal(types == code, row == tok):
                raise ValueError(f"prompt {b}: {name} token ids ({tok}) and mm_token_type_ids == {code} disagree")
        text_idx.append(np.nonzero(types == 0)[0])
        vis = np.nonzero(types != 0)[0]
        vis_idx.append(vis)
        dest.append(b * T + vis)
        row_visuals = list(p.visuals)
        _, counts = vision_layout(row_visuals, cfg) if row_visuals else (None, [])
        if sum(counts) != len(vis):
            raise ValueError(f"prompt {b}: {len(vis)} image/video placeholders but its visuals give {sum(counts)} "
                             f"tokens {counts}")
        start = 0  # each visual takes the next `count` placeholders: contiguous and of its kind
        for i, (v, c) in enumerate(zip(row_visuals, counts)):
            pos_i = vis[start:start + c]
            if pos_i[-1] - pos_i[0] != c - 1 or np.any(types[pos_i] != (1 if v.kind == "image" else 2)):
                raise ValueError(f"prompt {b}: visual {i} ({v.kind}, {c} tokens) does not match a contiguous run of "
                                 f"its placeholders")
            start += c
        visuals.extend(row_visuals)

    text_idx_BL, text_len = pad_index_rows(text_idx)
    vis_idx_BM, vis_len = pad_index_rows(vis_idx)
    pos = np.broadcast_to(np.arange(T, dtype=np.int32)[None, None], (3, B, T))
    has_vis = bool(visuals)
    if has_vis:  # pad tiles and visual tokens to buckets: fewer executables across batches
        # one host copy, padded in place (`target.prefill` moves it to the device chunk by chunk)
        parts = [np.asarray(v.pixel_values) for v in visuals]
        tiles = np.zeros((bucket(sum(len(x) for x in parts), TILE_BUCKET),) + parts[0].shape[1:], dtype)
        start = 0
        for x in parts:
            tiles[start:start + len(x)] = x
            start += len(x)
        layout = vision_layout(visuals, cfg)[0]
        dest = np.concatenate(dest)
        M = bucket(len(dest))
        # padded tokens: weight 0, destination b*T + t out of range -> dropped by the scatter
        dest = np.concatenate([dest, np.full(M - len(dest), B * T)])
        layout = LlavaVisionLayout(jnp.pad(layout.src_idx, ((0, M - len(layout.src_idx)), (0, 0))),
                                   jnp.pad(layout.src_w, ((0, M - len(layout.src_w)), (0, 0))))
    return PrefillBatch(
        input_ids_BT=jnp.asarray(ids), lengths_B=jnp.asarray(lens, jnp.int32), positions_3BT=jnp.asarray(pos),
        rope_delta_B=jnp.zeros((B,), jnp.int32), text_idx_BL=jnp.asarray(text_idx_BL),
        text_len_B=jnp.asarray(text_len), vis_idx_BM=jnp.asarray(vis_idx_BM), vis_len_B=jnp.asarray(vis_len),
        pixels_PC=tiles if has_vis else None,
        vision_layout=layout if has_vis else None,
        visual_dest=jnp.asarray(dest, jnp.int32) if has_vis else None,
    )

"""Target features for draft training: one function computes them, used offline (written to shards)
and online (inside the train step, nothing written) — so both modes see identical numbers."""

from __future__ import annotations

import dataclasses
from functools import lru_cache, partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from sparrow_jax.decoding.autoregressive import generate
from sparrow_jax.models import registry
from sparrow_jax.models import target as tg
from sparrow_jax.models.attention import MaskSpec
from sparrow_jax.training.data import FEATURE_FORMAT, FeatureRecord, Sample, SlotSpec, TrainBatch, collate, \
    read_index, sample_sequence, text_layout, write_shard


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    """Which target features a draft's training view reads: the visual state its visual slots carry
    (`views.visual_state` of the training view: "mid" = after layer m*, "embed" = the target's input
    embedding, None = no visual slots) and, for pruning by attention, the last prompt token's
    attention to the visual positions at layer m*."""

    m_star: int
    visual: str | None = "mid"
    scores: bool = False

    @property
    def vis_layer(self) -> int | None:
        return {"mid": self.m_star, "embed": 0, None: None}[self.visual]

    def meta(self) -> dict:
        return {"m_star": self.m_star, "visual": self.visual, "scores": self.scores, "format": FEATURE_FORMAT}

    def mismatch(self, meta: dict) -> str | None:
        """Why features extracted with `meta` cannot serve this spec (None when they can)."""
        if meta.get("format") != FEATURE_FORMAT:
            return f"feature format {meta.get('format')}, not {FEATURE_FORMAT}"
        if self.visual is not None and meta.get("visual") != self.visual:
            return f"visual states {meta.get('visual')!r}, not {self.visual!r}"
        if (self.visual == "mid" or self.scores) and meta.get("m_star") != self.m_star:
            return f"m* {meta.get('m_star')}, not {self.m_star}"
        if self.scores and not meta.get("scores"):
            return "no attention scores (pruning by attention needs them)"
        return None


def target_features(target, batch: tg.PrefillBatch, spec: FeatureSpec, prompt_len_B=None):
    """(h [B, L, D], hprev [B, L, D], vis [B, M, D] | None, vis_score [B, M] | None) at batch.text_idx_BL /
    batch.vis_idx_BM. vis_score needs each row's prompt length (the attending token is the last one)."""
    capture = tuple(sorted({i for i in (spec.vis_layer, spec.m_star if spec.scores else None) if i is not None}))
    h_BTD, kvs, cap = tg.forward(target, batch, capture=capture)
    idx = batch.text_idx_BL
    vis = None if spec.vis_layer is None else tg._gather_rows(cap[spec.vis_layer], batch.vis_idx_BM)
    score = None
    if spec.scores:
        at_prompt = dataclasses.replace(batch, lengths_B=prompt_len_B)
        s_BT = tg.last_token_attention(target, at_prompt, cap[spec.m_star], kvs[spec.m_star][0], spec.m_star)
        score = jnp.take_along_axis(s_BT, batch.vis_idx_BM, axis=1)
    return tg._gather_rows(h_BTD, idx), tg.hidden_before(h_BTD, idx), vis, score


@partial(jax.jit, static_argnames=("graphdef", "spec"))
def _features_jit(graphdef, params, batch, spec, prompt_len_B):
    return target_features(nnx.merge(graphdef, params), batch, spec, prompt_len_B)


def _sequences(target, samples: list[Sample], regenerate: int | None, prepare):
    if regenerate:  # responses from the target itself (what the draft will have to predict)
        outs = generate(target, [s.prompt for s in samples], max_new_tokens=regenerate, prepare=prepare)
        samples = [Sample(s.prompt, tuple(o)) for s, o in zip(samples, outs)]
    return [sample_sequence(s) for s in samples]


def records_for(target, samples: list[Sample], *, spec: FeatureSpec, regenerate: int | None = None, prepare=None):
    """Feature records of a list of samples (one padded target batch)."""
    prepare = prepare or registry.prepare_batch_for(target.cfg)
    seqs = _sequences(target, samples, regenerate, prepare)
    batch = _text_items(prepare([s for s, _ in seqs], target.cfg), seqs)
    graphdef, params = nnx.split(target)
    prompt_len = jnp.asarray([int((~a).sum()) for _, a in seqs], jnp.int32)
    h, hprev, vis, score = (None if x is None else np.asarray(x, np.float32)
                            for x in _features_jit(graphdef, params, batch, spec, prompt_len))
    out = []
    D = h.shape[-1]
    for b, (seq, assistant) in enumerate(seqs):
        is_vis = np.asarray(seq.mm_token_type_ids) != 0
        text_pos, pred, vis_pos = text_layout(is_vis, assistant)
        L, M = len(text_pos), len(vis_pos)
        out.append(FeatureRecord(
            text_ids=np.asarray(seq.input_ids)[text_pos].astype(np.int32), pred_mask=pred, h=h[b, :L],
            hprev=hprev[b, :L], vis=np.zeros((0, D), np.float32) if vis is None else vis[b, :M], is_vis=is_vis,
            vis_score=np.zeros((0,), np.float32) if score is None else score[b, :M]))
    return out


def _text_items(batch: tg.PrefillBatch, seqs) -> tg.PrefillBatch:
    """The batch with text_idx_BL holding the draft's text items (text positions t >= 1)."""
    rows = [text_layout(np.asarray(seq.mm_token_type_ids) != 0, a)[0] for seq, a in seqs]
    idx = np.zeros((len(rows), tg.bucket(max(max(len(r) for r in rows), 1))), np.int32)
    for b, r in enumerate(rows):
        idx[b, :len(r)] = r
    return dataclasses.replace(batch, text_idx_BL=jnp.asarray(idx))


def extract_features(target, samples: list[Sample], out_dir, *, spec: FeatureSpec, batch_size: int = 8,
                     shard_size: int = 64, regenerate: int | None = None, prepare=None, progress: bool = True) -> dict:
    """Offline extraction into `out_dir` (safetensors shards + index.json) of what `spec` asks for.
    Resumable: shards already in the index are skipped (an index written for another spec is refused)."""
    out_dir = Path(out_dir)
    index = read_index(out_dir) or {"shards": []}
    done = {s["file"] for s in index["shards"]}
    meta = {**spec.meta(), "hidden_size": target.cfg.text.hidden_size, "family": target.cfg.family,
            "num_samples": len(samples), "shard_size": shard_size, "regenerate": regenerate}
    if index.get("meta") and any(index["meta"].get(k) != v for k, v in spec.meta().items()):
        raise ValueError(f"{out_dir}: holds features for {index['meta']}, not {spec.meta()}; use another directory")
    n_shards = -(-len(samples) // shard_size)
    for k in tqdm(range(n_shards), desc="extracting features", disable=not progress, unit="shard"):
        if f"features-{k:05d}.safetensors" in done:
            continue
        chunk = samples[k * shard_size:(k + 1) * shard_size]
        recs = []
        for i in range(0, len(chunk), batch_size):
            recs += records_for(target, chunk[i:i + batch_size], spec=spec, regenerate=regenerate, prepare=prepare)
        index = write_shard(out_dir, k, recs, meta)
    return index


# ------------------------------------------------------------------------------------- online mode
#
# The online target runs inside the train step on rows laid out one per batch row, every leaf with
# the row first, so the batch shards over the data axes like the draft's slots (sharding.RULES["batch"])
# and each process builds only its own rows: no flat concatenation of the batch's pixels. A row's
# visuals are cut into the family's independent tower units (`visual_chunks` with one unit per call:
# a Qwen2.5-VL frame group, a LLaVA-OV tile), all of one shape and layout (the run's `VisualUnit`), and
# padded to the same unit count: fixed shapes per (T, units) bucket, encoded row by row on device.

# Families whose `combine_chunks` reads the batch's vision layout (LLaVA-OV's bilinear taps); the
# others' tower units already are the visual tokens in order.
ROW_COMBINE_FAMILIES = ("llava_onevision",)


@dataclasses.dataclass(frozen=True)
class VisualUnit:
    """One tower unit's pixel shape and layout (the same for every unit of a run), the visual tokens
    it gives (families whose units are the tokens) and, for ROW_COMBINE_FAMILIES, an empty row layout
    (the padding of a row without visuals)."""

    shape: tuple[int, ...]
    layout: object  # the family's chunk layout pytree (numpy), or None
    tokens: int = 0
    combine: object | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowPrefill:
    """The online target's inputs, every leaf but `unit_layout` [B, ...] (rows split over processes).
    Positions are stored row-first ([B, 3, T]); visual tokens land at `visual_dest_BN` (row-local
    positions; T = padding, dropped)."""

    input_ids_BT: jax.Array
    lengths_B: jax.Array
    positions_B3T: jax.Array
    text_idx_BL: jax.Array  # the draft's text items (t >= 1), right-padded with 0
    vis_idx_BM: jax.Array  # visual positions, right-padded with 0
    units_BU: jax.Array | None = None  # [B, U, *unit shape] tower units (zeros past a row's own)
    visual_dest_BN: jax.Array | None = None  # [B, N] where each encoded visual token goes
    combine_layout: object | None = None  # ROW_COMBINE_FAMILIES: the rows' layouts, [B, N, ...] leaves
    unit_layout: object | None = None  # one unit's layout (replicated)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class OnlineBatch:
    """Raw inputs for the in-step target plus the draft slots (features filled on device)."""

    prefill: RowPrefill
    train: TrainBatch  # h / hprev / vis are zeros until `fill_features`


@lru_cache(maxsize=8)
def _planner(target_cfg):
    """An abstract target of the config (no weights): the family's host-side unit plan (`visual_chunks`)."""
    return nnx.eval_shape(lambda: registry.build_target(target_cfg, rngs=nnx.Rngs(0)))


def _same_layout(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.shape(x) == np.shape(y) and np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def _row_inputs(seq, target_cfg, prepare, unit: VisualUnit | None, name: str) -> dict:
    """Host: one row's target inputs (its own T bucket) and its visuals cut into tower units."""
    pb = prepare([seq], target_cfg)
    row = dict(ids=np.asarray(pb.input_ids_BT)[0], length=int(np.asarray(pb.lengths_B)[0]),
               pos=np.asarray(pb.positions_3BT)[:, 0], units=[], unit=unit, dest=np.zeros((0,), np.int32),
               combine=None)
    if pb.pixels_PC is None:
        return row
    combine = None
    if target_cfg.family in ROW_COMBINE_FAMILIES:
        combine = row["combine"] = jax.tree.map(np.asarray, pb.vision_layout)
    chunks = list(_planner(target_cfg).visual_chunks(np.asarray(pb.pixels_PC), pb.vision_layout, 1))
    row["dest"] = np.asarray(pb.visual_dest, np.int32)  # b = 0: row-local positions
    for pixels, layout, _ in chunks:
        this = VisualUnit(tuple(pixels.shape), jax.tree.map(np.asarray, layout))
        if row["unit"] is None:
            row["unit"] = dataclasses.replace(
                this, tokens=len(row["dest"]) // len(chunks),
                combine=None if combine is None else jax.tree.map(lambda x: x[:0], combine))
        elif this.shape != row["unit"].shape or not _same_layout(this.layout, row["unit"].layout):
            raise ValueError(f"{name}: a visual tower unit of shape {this.shape} (and its layout) differs from the "
                             f"run's {row['unit'].shape}: online training splits rows with one visual unit shape "
                             "(one frame size; extract features offline for mixed sizes)")
        row["units"].append(pixels)
    return row


def reference_unit(samples, target_cfg, *, prepare=None, search: int = 256) -> VisualUnit | None:
    """The run's tower unit: the first one of the first sample with visuals among the first `search`
    (every process reads the same samples, so all agree); None for text-only data."""
    prepare = prepare or registry.prepare_batch_for(target_cfg)
    for i in range(min(len(samples), search)):
        s = samples[i]
        if np.any(np.asarray(s.prompt.mm_token_type_ids)):
            return _row_inputs(sample_sequence(s)[0], target_cfg, prepare, None, f"sample {i}")["unit"]
    return None


def _pad_to(x, n, axis=0, value=0):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n - x.shape[axis])
    return np.pad(x, pad, constant_values=value)


def online_batch(samples: list[Sample], target_cfg, *, L: int, M: int, slots: SlotSpec, prepare=None,
                 unit: VisualUnit | None = None, agree=None, names=None) -> OnlineBatch:
    """Host: the online batch of these rows (a process's own rows of the global batch). `unit`: the
    run's tower unit (`reference_unit`; default: the first of these rows). `agree(v) -> v`: the
    elementwise max of the shape vector (T, units per row, layout rows) over processes, so every
    process pads to the same shapes (default: these rows alone). Shapes are bucketed: few compiles."""
    if slots.view == "pruned" and slots.prune_by == "attention":
        raise ValueError("online training cannot prune by attention (the slots are laid out before the target "
                         "runs): extract features offline (train.py --extract-features) or prune uniformly")
    prepare = prepare or registry.prepare_batch_for(target_cfg)
    names = names or [f"sample {b}" for b in range(len(samples))]
    seqs = [sample_sequence(s) for s in samples]
    B = len(seqs)
    text_idx, vis_idx = np.zeros((B, L), np.int32), np.zeros((B, M), np.int32)
    recs, rows = [], []
    for b, (seq, assistant) in enumerate(seqs):
        is_vis = np.asarray(seq.mm_token_type_ids) != 0
        tp, pred, vp = text_layout(is_vis, assistant)
        if len(tp) > L or len(vp) > M:
            raise ValueError(f"{names[b]}: {len(tp)} text / {len(vp)} visual positions exceed max_text {L} / "
                             f"max_visual {M}")
        text_idx[b, :len(tp)], vis_idx[b, :len(vp)] = tp, vp
        z = lambda n: np.zeros((n, 1), np.float32)  # noqa: E731 — placeholder features, filled on device
        recs.append(FeatureRecord(np.asarray(seq.input_ids)[tp].astype(np.int32), pred, z(len(tp)), z(len(tp)),
                                  z(len(vp)), is_vis, np.zeros((0,), np.float32)))
        row = _row_inputs(seq, target_cfg, prepare, unit, names[b])
        unit = unit or row["unit"]
        rows.append(row)
    train = collate(recs, L=L, M=M, spec=slots)
    D = target_cfg.text.hidden_size
    train = dataclasses.replace(train, h_BLD=np.zeros((B, L, D), np.float32), hprev_BLD=np.zeros((B, L, D), np.float32),
                                vis_BMD=np.zeros((B, M, D), np.float32))
    n_units = max(len(r["units"]) for r in rows)
    n_combine = max((len(jax.tree.leaves(r["combine"])[0]) for r in rows if r["combine"] is not None), default=0)
    shape = np.asarray([max(len(r["ids"]) for r in rows), 1 << (n_units - 1).bit_length() if n_units else 0,
                        n_combine], np.int64)
    T, U, NC = (int(x) for x in (agree(shape) if agree is not None else shape))
    ids, pos = np.zeros((B, T), np.int32), np.zeros((B, 3, T), np.int32)
    for b, r in enumerate(rows):
        n = len(r["ids"])
        ids[b, :n], pos[b, :, :n] = r["ids"], r["pos"]
        pos[b, :, n:] = r["pos"][:, n - 1:n] + 1 + np.arange(T - n)  # padding positions: harmless, masked
    prefill = RowPrefill(ids, np.asarray([r["length"] for r in rows], np.int32), pos, text_idx, vis_idx)
    if U:
        if unit is None:
            raise ValueError("online_batch: other rows of the global batch have visuals but no VisualUnit was "
                             "given (pass reference_unit(samples, cfg))")
        units = np.zeros((B, U, *unit.shape), np.float32)
        for b, r in enumerate(rows):
            if r["units"]:
                units[b, :len(r["units"])] = np.stack(r["units"])
        combine = None
        if target_cfg.family in ROW_COMBINE_FAMILIES:
            N = NC
            combine = jax.tree.map(lambda *xs: np.stack([_pad_to(x, N) for x in xs]),
                                   *[unit.combine if r["combine"] is None else r["combine"] for r in rows])
        else:
            N = U * unit.tokens
        dest = np.full((B, N), T, np.int32)
        for b, r in enumerate(rows):
            dest[b, :len(r["dest"])] = r["dest"]
        prefill = dataclasses.replace(prefill, units_BU=units, visual_dest_BN=dest, combine_layout=combine,
                                      unit_layout=unit.layout)
    return OnlineBatch(prefill, train)


def encode_rows(target, rp: RowPrefill):
    """Device: every row's visual tokens [B, N, D] (row by row; units are independent in the tower)."""
    enc = lambda px: target.encode_chunk(px, rp.unit_layout)  # noqa: E731
    feats = jax.vmap(jax.vmap(enc))(rp.units_BU)  # [B, U, R, D]
    B, U, R, D = feats.shape
    feats = feats.reshape(B, U * R, D)
    return feats if rp.combine_layout is None else jax.vmap(target.combine_chunks)(feats, rp.combine_layout)


def row_forward(target, rp: RowPrefill, *, capture=()):
    """`target.forward` on row-first inputs: the visuals are encoded and scattered row by row, so the
    whole forward stays split over the batch axis."""
    x_BTD = target.embed(rp.input_ids_BT)
    if rp.units_BU is not None:
        feats = encode_rows(target, rp)
        put = lambda x_TD, d_N, f_ND: x_TD.at[d_N].set(f_ND.astype(x_TD.dtype), mode="drop")  # noqa: E731
        x_BTD = jax.vmap(put)(x_BTD, rp.visual_dest_BN, feats)
    cos, sin = target.rope(jnp.moveaxis(rp.positions_B3T, 1, 0))
    mask = MaskSpec(kv_len_B=rp.lengths_B, causal=True)
    return target.decoder(x_BTD, cos, sin, mask, capture=capture)


def fill_features(target, ob: OnlineBatch, spec: FeatureSpec) -> TrainBatch:
    """Device: run the frozen target and place its features into the training batch (padding rows
    of the text/visual index point at position 0 and are masked by the loss)."""
    rp = ob.prefill
    h_BTD, _, cap = row_forward(target, rp, capture=() if spec.vis_layer is None else (spec.vis_layer,))
    sg = lambda x: jax.lax.stop_gradient(x.astype(jnp.float32))  # noqa: E731
    vis = None if spec.vis_layer is None else tg._gather_rows(cap[spec.vis_layer], rp.vis_idx_BM)
    return dataclasses.replace(ob.train, h_BLD=sg(tg._gather_rows(h_BTD, rp.text_idx_BL)),
                               hprev_BLD=sg(tg.hidden_before(h_BTD, rp.text_idx_BL)),
                               vis_BMD=ob.train.vis_BMD if vis is None else sg(vis))

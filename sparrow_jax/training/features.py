"""Target features for draft training: one function computes them, used offline (written to shards)
and online (inside the train step, nothing written) — so both modes see identical numbers."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import lru_cache
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
from sparrow_jax.runtime import graph_jit
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


@graph_jit(graphs=("graphdef",), static_argnames=("graphdef", "spec"))
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


def extract_features(target, samples: Sequence[Sample], out_dir, *, spec: FeatureSpec, batch_size: int = 8,
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
        # by index, not a slice: lazy sources (world.WorldDataset renders on access) take integers only
        chunk = [samples[i] for i in range(k * shard_size, min((k + 1) * shard_size, len(samples)))]
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
# a Qwen2.5-VL frame group, a LLaVA-OV tile). Units of different sizes (frame sizes) are grown to the
# batch's largest (`pad_chunk`: padding that the unit's own outputs never see) and stacked with their
# layouts as [B, U, ...] data; rows are padded to the same unit count. The tower's valid output rows
# are gathered back in order (`src_unit_BN` / `src_row_BN`). Fixed shapes per (T, units, unit sizes).

# Families whose `combine_chunks` reads the batch's vision layout (LLaVA-OV's bilinear taps); the
# others' tower units already are the visual tokens in order.
ROW_COMBINE_FAMILIES = ("llava_onevision",)


@dataclasses.dataclass(frozen=True)
class VisualUnit:
    """A tower unit of the run (its pixels and layout, numpy): the padding unit of rows with fewer units
    (grown to the batch's sizes, all its outputs dropped); `dims`: its `chunk_dims` (their count is the
    same for every unit); `combine`: for ROW_COMBINE_FAMILIES, an empty row layout (a row without visuals)."""

    pixels: np.ndarray
    layout: object  # the family's chunk layout pytree (numpy), or None
    dims: tuple[int, ...] = ()
    combine: object | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RowPrefill:
    """The online target's inputs, every leaf [B, ...] (rows split over processes). Positions are stored
    row-first ([B, 3, T]); visual tokens land at `visual_dest_BN` (row-local positions; T = padding, dropped)."""

    input_ids_BT: jax.Array
    lengths_B: jax.Array
    positions_B3T: jax.Array
    text_idx_BL: jax.Array  # the draft's text items (t >= 1), right-padded with 0
    vis_idx_BM: jax.Array  # visual positions, right-padded with 0
    units_BU: jax.Array | None = None  # [B, U, *unit shape] tower units, grown to one shape (zeros past a row's own)
    unit_layout: object | None = None  # their layouts, [B, U, ...] leaves (None: the family's units have none)
    src_unit_BN: jax.Array | None = None  # [B, N] the unit and output row of each of the row's tower outputs, in
    src_row_BN: jax.Array | None = None  # order (the visual tokens, or the table `combine_chunks` reads)
    visual_dest_BN: jax.Array | None = None  # [B, N'] where each visual token goes
    combine_layout: object | None = None  # ROW_COMBINE_FAMILIES: the rows' layouts, [B, N', ...] leaves


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class OnlineBatch:
    """Raw inputs for the in-step target plus the draft slots (features filled on device)."""

    prefill: RowPrefill
    train: TrainBatch  # h / hprev / vis are zeros until `fill_features`


@lru_cache(maxsize=8)
def _planner(target_cfg):
    """An abstract target of the config (no weights): the family's host-side unit plan (`visual_chunks`,
    `chunk_dims`, `pad_chunk`)."""
    return nnx.eval_shape(lambda: registry.build_target(target_cfg, rngs=nnx.Rngs(0)))


def _row_inputs(seq, target_cfg, prepare) -> dict:
    """Host: one row's target inputs (its own T bucket) and its visuals cut into tower units
    [(pixels, layout, valid output rows)]."""
    pb = prepare([seq], target_cfg)
    row = dict(ids=np.asarray(pb.input_ids_BT)[0], length=int(np.asarray(pb.lengths_B)[0]),
               pos=np.asarray(pb.positions_3BT)[:, 0], units=[], dest=np.zeros((0,), np.int32), combine=None)
    if pb.pixels_PC is None:
        return row
    if target_cfg.family in ROW_COMBINE_FAMILIES:
        row["combine"] = jax.tree.map(np.asarray, pb.vision_layout)
    row["dest"] = np.asarray(pb.visual_dest, np.int32)  # b = 0: row-local positions
    row["units"] = [(np.asarray(px), jax.tree.map(np.asarray, layout), int(valid)) for px, layout, valid in
                    _planner(target_cfg).visual_chunks(np.asarray(pb.pixels_PC), pb.vision_layout, 1)]
    return row


def _unit_of(row, target_cfg) -> VisualUnit:
    pixels, layout, _ = row["units"][0]
    combine = None if row["combine"] is None else jax.tree.map(lambda x: x[:0], row["combine"])
    return VisualUnit(pixels, layout, tuple(_planner(target_cfg).chunk_dims(pixels, layout)), combine)


def reference_unit(samples, target_cfg, *, prepare=None, search: int = 256) -> VisualUnit | None:
    """The run's padding unit: the first one of the first sample with visuals among the first `search`
    (every process reads the same samples, so all agree); None for text-only data."""
    prepare = prepare or registry.prepare_batch_for(target_cfg)
    for i in range(min(len(samples), search)):
        s = samples[i]
        if np.any(np.asarray(s.prompt.mm_token_type_ids)):
            return _unit_of(_row_inputs(sample_sequence(s)[0], target_cfg, prepare), target_cfg)
    return None


def _pad_to(x, n, axis=0, value=0):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n - x.shape[axis])
    return np.pad(x, pad, constant_values=value)


def online_batch(samples: list[Sample], target_cfg, *, L: int, M: int, slots: SlotSpec, prepare=None,
                 unit: VisualUnit | None = None, agree=None, names=None) -> OnlineBatch:
    """Host: the online batch of these rows (a process's own rows of the global batch). `unit`: the
    run's padding unit (`reference_unit`), for processes whose rows have no visuals. `agree(v) -> v`: the
    elementwise max of the shape vector (T, units per row, tower outputs per row, tokens per row, unit
    sizes) over processes, so every process pads to the same shapes (default: these rows alone).
    Shapes are bucketed: few compiles."""
    if slots.view == "pruned" and slots.prune_by == "attention":
        raise ValueError("online training cannot prune by attention (the slots are laid out before the target "
                         "runs): extract features offline (train.py --extract-features) or prune uniformly")
    prepare = prepare or registry.prepare_batch_for(target_cfg)
    names = names or [f"sample {b}" for b in range(len(samples))]
    planner = _planner(target_cfg)
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
        rows.append(_row_inputs(seq, target_cfg, prepare))
    train = collate(recs, L=L, M=M, spec=slots)
    D = target_cfg.text.hidden_size
    train = dataclasses.replace(train, h_BLD=np.zeros((B, L, D), np.float32), hprev_BLD=np.zeros((B, L, D), np.float32),
                                vis_BMD=np.zeros((B, M, D), np.float32))
    pow2 = lambda n: 1 << (n - 1).bit_length() if n else 0  # noqa: E731
    # The padding unit: these rows' first (no larger than the batch's sizes), else the run's, whose sizes
    # then join the agreement (a process without visuals pads rows that other processes fill).
    own = next((r for r in rows if r["units"]), None)
    unit = unit if own is None else _unit_of(own, target_cfg)
    dims = np.zeros((0,), np.int64) if unit is None else np.asarray(unit.dims, np.int64) * (own is None)
    for r in rows:
        for px, layout, _ in r["units"]:
            dims = np.maximum(dims, planner.chunk_dims(px, layout))
    n_out = max(sum(v for _, _, v in r["units"]) for r in rows)
    n_combine = max((len(jax.tree.leaves(r["combine"])[0]) for r in rows if r["combine"] is not None), default=0)
    shape = np.asarray([max(len(r["ids"]) for r in rows), pow2(max(len(r["units"]) for r in rows)),
                        tg.bucket(n_out) if n_out else 0, tg.bucket(n_combine) if n_combine else 0, *dims], np.int64)
    shape = agree(shape) if agree is not None else shape
    T, U, N, NC = (int(x) for x in shape[:4])
    dims = tuple(int(x) for x in shape[4:])
    ids, pos = np.zeros((B, T), np.int32), np.zeros((B, 3, T), np.int32)
    for b, r in enumerate(rows):
        n = len(r["ids"])
        ids[b, :n], pos[b, :, :n] = r["ids"], r["pos"]
        pos[b, :, n:] = r["pos"][:, n - 1:n] + 1 + np.arange(T - n)  # padding positions: harmless, masked
    prefill = RowPrefill(ids, np.asarray([r["length"] for r in rows], np.int32), pos, text_idx, vis_idx)
    if not U:
        return OnlineBatch(prefill, train)
    if unit is None:
        raise ValueError("online_batch: other rows of the global batch have visuals but no VisualUnit was "
                         "given (pass reference_unit(samples, cfg))")
    # Every unit grown to the batch's sizes; rows padded with the run's unit (its outputs all dropped).
    pad = planner.pad_chunk(unit.pixels, unit.layout, dims)
    grown = [[planner.pad_chunk(px, layout, dims) for px, layout, _ in r["units"]] for r in rows]
    grown = [g + [pad] * (U - len(g)) for g in grown]
    units = np.stack([np.stack([px for px, _ in g]) for g in grown]).astype(np.float32)
    unit_layout = jax.tree.map(lambda *xs: np.stack(xs).reshape(B, U, *np.shape(xs[0])),
                               *[layout for g in grown for _, layout in g])
    src_unit, src_row = np.zeros((B, N), np.int32), np.zeros((B, N), np.int32)
    for b, r in enumerate(rows):
        valid = [v for _, _, v in r["units"]]
        src_unit[b, :sum(valid)] = np.repeat(np.arange(len(valid)), valid)
        src_row[b, :sum(valid)] = np.concatenate([np.arange(v) for v in valid]) if valid else []
    combine = None
    if target_cfg.family in ROW_COMBINE_FAMILIES:
        combine = jax.tree.map(lambda *xs: np.stack([_pad_to(x, NC) for x in xs]),
                               *[unit.combine if r["combine"] is None else r["combine"] for r in rows])
    dest = np.full((B, NC if combine is not None else N), T, np.int32)
    for b, r in enumerate(rows):
        dest[b, :len(r["dest"])] = r["dest"]
    prefill = dataclasses.replace(prefill, units_BU=units, unit_layout=unit_layout, src_unit_BN=src_unit,
                                  src_row_BN=src_row, visual_dest_BN=dest, combine_layout=combine)
    return OnlineBatch(prefill, train)


def encode_rows(target, rp: RowPrefill):
    """Device: every row's visual tokens [B, N', D] (unit by unit: units are independent in the tower)."""
    feats = jax.vmap(jax.vmap(target.encode_chunk))(rp.units_BU, rp.unit_layout)  # [B, U, R, D]
    feats = jax.vmap(lambda f, u, r: f[u, r])(feats, rp.src_unit_BN, rp.src_row_BN)  # the valid rows, in order
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

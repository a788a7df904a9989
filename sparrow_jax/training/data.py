"""Training data: samples, target features, the draft's training slots, shards and the grain pipeline.

A *sample* is a multimodal prompt plus a response (token ids). Its *features* (what the draft learns
from) are, for the L text positions t >= 1 of the full sequence (the draft's text items; the official
convention pairs t1 with h0 first, so position 0 has none): the token id, the target's final-norm hidden
h_t (the draft's regression target; softmax(lm_head(h_t)) is its distribution target), h_{t-1} (the HSR
input), whether token t+1 is an assistant token (loss mask); and, for the M visual positions, the
visual state the draft's view carries (`vis_layer`: m* for IVSB / ivsb_mid, 0 = the target's input
embedding for msd / pruned) and, for pruning by attention, the last prompt token's attention to them.
`is_vis` [T] keeps the interleaving.

Training *slots* are the draft's sequence in its training view (`views.training_view`): exactly the
items, inputs and positions `views.sequence_layout` gives the engine's draft prefill. For Sparrow
(view none + IVSB) that is the ivsb_mid layout: a text slot takes its compacted text index, the
position it keeps at inference where visual positions are cut out, and a visual slot the index of the
text item before it, so text-to-text distances equal inference's.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import grain
import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from sparrow_jax.models import views

FEATURE_FORMAT = 2  # 2: text items from t = 1 (official sequence convention), view-dependent `vis`


@dataclasses.dataclass(frozen=True)
class Sample:
    prompt: object  # MultimodalPrompt-like: input_ids, mm_token_type_ids, visuals
    response: tuple[int, ...]
    # Which response tokens are the assistant's (multi-turn: follow-up user turns inside the response are
    # context, not targets); None = all of them.
    response_mask: tuple[bool, ...] | None = None

    def __post_init__(self):
        if self.response_mask is not None and len(self.response_mask) != len(self.response):
            raise ValueError(f"Sample: response_mask has {len(self.response_mask)} entries for "
                             f"{len(self.response)} response tokens")


def sample_sequence(sample: Sample):
    """Prompt + response as one sequence; returns (prompt-like object, assistant mask [T])."""
    p = sample.prompt
    resp = np.asarray(sample.response, np.int32)
    fields = dict(input_ids=np.concatenate([np.asarray(p.input_ids, np.int32), resp]),
                  mm_token_type_ids=np.concatenate([np.asarray(p.mm_token_type_ids, np.int32),
                                                    np.zeros(len(resp), np.int32)]))
    seq = dataclasses.replace(p, **fields) if dataclasses.is_dataclass(p) else type(p)(**{**vars(p), **fields})
    resp_mask = np.ones(len(resp), bool) if sample.response_mask is None else np.asarray(sample.response_mask, bool)
    assistant = np.concatenate([np.zeros(len(p.input_ids), bool), resp_mask])
    return seq, assistant


@dataclasses.dataclass
class FeatureRecord:
    text_ids: np.ndarray  # [L] int32
    pred_mask: np.ndarray  # [L] bool: token after this text position is an assistant token
    h: np.ndarray  # [L, D] final-norm hidden at the text positions
    hprev: np.ndarray  # [L, D] final-norm hidden at the position before (t - 1)
    vis: np.ndarray  # [M, D] the view's visual state at the visual positions ([0, D] if none is needed)
    is_vis: np.ndarray  # [T] bool, the interleaving of text and visual positions
    vis_score: np.ndarray  # [M] last prompt token's attention at layer m* ([0] unless asked for)

    def to_arrays(self, prefix: str) -> dict:
        return {f"{prefix}/{f.name}": np.ascontiguousarray(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_arrays(cls, arrays: dict, prefix: str) -> "FeatureRecord":
        return cls(**{f.name: arrays[f"{prefix}/{f.name}"] for f in dataclasses.fields(cls)})


def text_layout(is_vis_T, assistant_T):
    """Host: the draft's text item positions (text, t >= 1), their predict mask (next token is
    assistant), visual positions."""
    text_pos = np.nonzero(~is_vis_T)[0]
    text_pos = text_pos[text_pos >= 1]
    vis_pos = np.nonzero(is_vis_T)[0]
    nxt = np.append(assistant_T[1:], False)
    return text_pos, nxt[text_pos], vis_pos


# --------------------------------------------------------------------------------------- slots


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainBatch:
    """Fixed-shape draft-training batch (padded to the config's L, M; S slots: `SlotSpec.slots`)."""

    tok_BL: jax.Array
    pred_BL: jax.Array  # float 0/1 loss weights
    h_BLD: jax.Array
    hprev_BLD: jax.Array
    vis_BMD: jax.Array
    slot_src_BS: jax.Array  # index into concat(text L, visual M) sources
    slot_is_text_BS: jax.Array
    slot_pos_BS: jax.Array
    slot_len_B: jax.Array
    text_slot_BL: jax.Array  # slot of each text token


def slot_layout(is_vis_T, L: int, view: str, kept_vis=None):
    """Host: slot arrays for one record (unpadded) in a training view: src (text item ordinal, or L +
    visual ordinal), is_text, pos, and each text item's slot. Items and positions are
    `views.sequence_layout`'s, i.e. the engine's."""
    is_vis = np.asarray(is_vis_T, bool)
    src_pos, is_text, pos, _ = views.sequence_layout(is_vis, view, kept_vis)
    txt_ord = np.cumsum(~is_vis) - 1 - int(not is_vis[0])  # ordinal among the text items (t >= 1)
    vis_ord = np.cumsum(is_vis) - 1
    src = np.where(is_text, txt_ord[src_pos], L + vis_ord[src_pos])
    return src, is_text, pos, np.nonzero(is_text)[0]


@dataclasses.dataclass(frozen=True)
class SlotSpec:
    """How records become slots: the training view (`views.training_view`) and, for the pruned view,
    the kept fraction and rule (as the draft's config records them)."""

    view: str = "none"
    keep_fraction: float = views.DEFAULT_KEEP_FRACTION
    prune_by: str = "uniform"

    def slots(self, L: int, M: int) -> int:
        if self.view == "none":
            return L
        return L + (views.num_kept(M, self.keep_fraction) if self.view == "pruned" else M)

    def kept(self, r: "FeatureRecord"):
        if self.view != "pruned":
            return None
        n = int(np.asarray(r.is_vis).sum())
        if self.prune_by == "attention" and len(r.vis_score) != n:
            raise ValueError(f"pruning by attention needs the records' vis_score ({len(r.vis_score)} for {n} visual "
                             "positions): extract features with the pruned view's settings")
        return views.kept_visual(n, self.keep_fraction, r.vis_score if self.prune_by == "attention" else None)


def collate(records: list[FeatureRecord], *, L: int, M: int, spec: SlotSpec) -> TrainBatch:
    """Pad records to fixed shapes (one compiled train step for every batch). Text beyond L or visual
    beyond M is an error: raise the config's limits."""
    B = len(records)
    D = records[0].h.shape[1]
    S = spec.slots(L, M)
    uses_vis = spec.view != "none"
    out = dict(tok_BL=np.zeros((B, L), np.int32), pred_BL=np.zeros((B, L), np.float32),
               h_BLD=np.zeros((B, L, D), np.float32), hprev_BLD=np.zeros((B, L, D), np.float32),
               vis_BMD=np.zeros((B, M, D), np.float32), slot_src_BS=np.zeros((B, S), np.int32),
               slot_is_text_BS=np.zeros((B, S), bool), slot_pos_BS=np.zeros((B, S), np.int32),
               slot_len_B=np.zeros((B,), np.int32), text_slot_BL=np.zeros((B, L), np.int32))
    for b, r in enumerate(records):
        n, m = len(r.text_ids), int(np.asarray(r.is_vis).sum())
        if n > L or (uses_vis and m > M):
            raise ValueError(f"record {b}: {n} text / {m} visual positions exceed the configured max_text {L} / "
                             f"max_visual {M}")
        out["tok_BL"][b, :n] = r.text_ids
        out["pred_BL"][b, :n] = r.pred_mask
        out["h_BLD"][b, :n] = r.h
        out["hprev_BLD"][b, :n] = r.hprev
        if uses_vis:
            if len(r.vis) != m:
                raise ValueError(f"record {b}: {len(r.vis)} visual states for {m} visual positions (features "
                                 f"extracted for another view?)")
            out["vis_BMD"][b, :m] = r.vis
        src, is_text, pos, text_slot = slot_layout(r.is_vis, L, spec.view, spec.kept(r))
        s = len(src)
        out["slot_src_BS"][b, :s], out["slot_is_text_BS"][b, :s], out["slot_pos_BS"][b, :s] = src, is_text, pos
        out["slot_len_B"][b] = s
        out["text_slot_BL"][b, :n] = text_slot
    return TrainBatch(**out)


# -------------------------------------------------------------------------------------- shards

INDEX = "index.json"


def write_shard(out_dir: Path, shard_id: int, records: list[FeatureRecord], meta: dict) -> dict:
    """One safetensors file per shard; the index is rewritten atomically after each shard, so an
    interrupted extraction resumes after the last complete shard."""
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"features-{shard_id:05d}.safetensors"
    arrays = {}
    for i, r in enumerate(records):
        rec = r.to_arrays(str(i))
        rec[f"{i}/pred_mask"] = rec[f"{i}/pred_mask"].astype(np.uint8)
        rec[f"{i}/is_vis"] = rec[f"{i}/is_vis"].astype(np.uint8)
        arrays.update(rec)
    tmp = out_dir / (name + ".tmp")
    save_file(arrays, str(tmp))
    os.replace(tmp, out_dir / name)
    index = read_index(out_dir) or {"meta": meta, "shards": []}
    entry = {"file": name, "records": len(records), "visual": [bool(np.any(r.is_vis)) for r in records]}
    index["shards"] = [s for s in index["shards"] if s["file"] != name] + [entry]
    tmp_idx = out_dir / (INDEX + ".tmp")
    tmp_idx.write_text(json.dumps(index, indent=1))
    os.replace(tmp_idx, out_dir / INDEX)
    return index


def read_index(out_dir: Path) -> dict | None:
    p = Path(out_dir) / INDEX
    return json.loads(p.read_text()) if p.is_file() else None


class ShardSource:
    """Random access over all records of a feature directory (grain data source protocol)."""

    def __init__(self, out_dir):
        self.dir = Path(out_dir)
        index = read_index(self.dir)
        if index is None:
            raise FileNotFoundError(f"{self.dir}: no {INDEX} (run feature extraction first)")
        self.meta = index["meta"]
        if self.meta.get("format") != FEATURE_FORMAT:
            raise ValueError(f"{self.dir}: feature format {self.meta.get('format')} (this code reads format "
                             f"{FEATURE_FORMAT}: text items from t = 1, view-dependent visual states); re-extract")
        self._where = [(s["file"], i) for s in index["shards"] for i in range(s["records"])]
        self.visual = [v for s in index["shards"] for v in s["visual"]]  # record has visual positions
        self._cache: dict[str, dict] = {}

    def __len__(self):
        return len(self._where)

    def __getitem__(self, i: int) -> FeatureRecord:
        f, j = self._where[i]
        if f not in self._cache:
            self._cache = {f: load_file(str(self.dir / f))}  # keep one shard in memory
        r = FeatureRecord.from_arrays(self._cache[f], str(j))
        return dataclasses.replace(r, pred_mask=r.pred_mask.astype(bool), is_vis=r.is_vis.astype(bool))


# --------------------------------------------------------------------------------- grain pipeline


def index_pipeline(num_records: int, global_batch: int, seed: int):
    """Global batches of record indices, identical on every process (seeded shuffle, reshuffled each
    epoch); each process then loads only its rows (`process_rows`), so the global batch does not depend
    on the number of processes. Returns a grain iterator (get_state/set_state for exact resume)."""
    if num_records < global_batch:
        raise ValueError(f"{num_records} records cannot fill a global batch of {global_batch}")
    ds = grain.MapDataset.range(num_records).shuffle(seed=seed).repeat(None).batch(global_batch, drop_remainder=True)
    return ds.to_iter_dataset().__iter__()


class CurriculumBatches:
    """MSD's data curriculum: global batches of record indices, text-only records only for the first
    `text_steps` steps, then a visual share rising linearly to 1 over `ramp_steps` steps (each row is
    a visual record with that probability). Batch s is a pure function of (seed, s), identical on every
    process; the state is the step (get_state/set_state, as the grain iterator, for exact resume)."""

    def __init__(self, is_visual, global_batch: int, seed: int, text_steps: int, ramp_steps: int):
        flags = np.asarray(is_visual, bool)
        self.text, self.visual = np.nonzero(~flags)[0], np.nonzero(flags)[0]
        if not len(self.text) or not len(self.visual):
            raise ValueError(f"a visual curriculum needs text-only and visual records: the data has {len(self.text)} "
                             f"text-only and {len(self.visual)} visual ones")
        self.B, self.seed, self.text_steps, self.ramp_steps = global_batch, seed, text_steps, ramp_steps
        self.step = 0

    def visual_share(self, step: int) -> float:
        if step < self.text_steps:
            return 0.0
        return min(1.0, (step - self.text_steps + 1) / max(self.ramp_steps, 1))

    def __iter__(self):
        return self

    def __next__(self):
        rng = np.random.default_rng([self.seed, self.step])
        visual = rng.random(self.B) < self.visual_share(self.step)
        pick = lambda pool: pool[rng.integers(0, len(pool), self.B)]  # noqa: E731
        self.step += 1
        return np.where(visual, pick(self.visual), pick(self.text))

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])


def process_rows(global_batch: int, process_index: int, process_count: int) -> slice:
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
    n = global_batch // process_count
    return slice(process_index * n, (process_index + 1) * n)

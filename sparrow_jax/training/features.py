"""Target features for draft training: one function computes them, used offline (written to shards)
and online (inside the train step, nothing written) — so both modes see identical numbers."""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from sparrow_jax.decoding.autoregressive import generate
from sparrow_jax.models import registry
from sparrow_jax.models import target as tg
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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class OnlineBatch:
    """Raw inputs for the in-step target plus the draft slots (features filled on device)."""

    prefill: tg.PrefillBatch  # text_idx_BL / vis_idx_BM padded to the training L / M
    train: TrainBatch  # h / hprev / vis are zeros until `fill_features`


def online_batch(samples: list[Sample], target_cfg, *, L: int, M: int, slots: SlotSpec, prepare=None) -> OnlineBatch:
    if slots.view == "pruned" and slots.prune_by == "attention":
        raise ValueError("online training cannot prune by attention (the slots are laid out before the target "
                         "runs): extract features offline (train.py --extract-features) or prune uniformly")
    seqs = [sample_sequence(s) for s in samples]
    batch = (prepare or registry.prepare_batch_for(target_cfg))([s for s, _ in seqs], target_cfg)
    B = len(seqs)
    text_idx, vis_idx = np.zeros((B, L), np.int32), np.zeros((B, M), np.int32)
    recs = []
    for b, (seq, assistant) in enumerate(seqs):
        is_vis = np.asarray(seq.mm_token_type_ids) != 0
        tp, pred, vp = text_layout(is_vis, assistant)
        if len(tp) > L or len(vp) > M:
            raise ValueError(f"sample {b}: {len(tp)} text / {len(vp)} visual positions exceed max_text {L} / max_visual {M}")
        text_idx[b, :len(tp)], vis_idx[b, :len(vp)] = tp, vp
        z = lambda n: np.zeros((n, 1), np.float32)  # noqa: E731 — placeholder features, filled on device
        recs.append(FeatureRecord(np.asarray(seq.input_ids)[tp].astype(np.int32), pred, z(len(tp)), z(len(tp)),
                                  z(len(vp)), is_vis, np.zeros((0,), np.float32)))
    train = collate(recs, L=L, M=M, spec=slots)
    D = target_cfg.text.hidden_size
    train = dataclasses.replace(train, h_BLD=np.zeros((B, L, D), np.float32), hprev_BLD=np.zeros((B, L, D), np.float32),
                                vis_BMD=np.zeros((B, M, D), np.float32))
    prefill = dataclasses.replace(batch, text_idx_BL=jnp.asarray(text_idx), vis_idx_BM=jnp.asarray(vis_idx))
    return OnlineBatch(prefill, jax.tree.map(jnp.asarray, train))


def fill_features(target, ob: OnlineBatch, spec: FeatureSpec) -> TrainBatch:
    """Device: run the frozen target and place its features into the training batch (padding rows
    of the text/visual index point at position 0 and are masked by the loss)."""
    h, hprev, vis, _ = target_features(target, ob.prefill, spec)
    sg = lambda x: jax.lax.stop_gradient(x.astype(jnp.float32))  # noqa: E731
    return dataclasses.replace(ob.train, h_BLD=sg(h), hprev_BLD=sg(hprev),
                               vis_BMD=ob.train.vis_BMD if vis is None else sg(vis))

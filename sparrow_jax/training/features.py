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

from sparrow_jax.models import target as tg
from sparrow_jax.training.data import FeatureRecord, Sample, TrainBatch, collate, read_index, sample_sequence, \
    text_layout, write_shard


def target_features(target, batch: tg.PrefillBatch, m_star: int):
    """(h [B, L, D], hprev [B, L, D], vis [B, M, D]) at batch.text_idx_BL / batch.vis_idx_BM."""
    h_BTD, _, cap = tg.forward(target, batch, capture=(m_star,))
    idx = batch.text_idx_BL
    h = tg._gather_rows(h_BTD, idx)
    hprev = jnp.where((idx > 0)[..., None], tg._gather_rows(h_BTD, jnp.maximum(idx - 1, 0)), 0)
    return h, hprev, tg._gather_rows(cap[m_star], batch.vis_idx_BM)


@partial(jax.jit, static_argnames=("graphdef", "m_star"))
def _features_jit(graphdef, params, batch, m_star):
    return target_features(nnx.merge(graphdef, params), batch, m_star)


def _sequences(target, samples: list[Sample], regenerate: int | None, prepare):
    if regenerate:  # responses from the target itself (what the draft will have to predict)
        from sparrow_jax.decoding.autoregressive import generate  # noqa: PLC0415

        outs = generate(target, [s.prompt for s in samples], max_new_tokens=regenerate, prepare=prepare)
        samples = [Sample(s.prompt, tuple(o)) for s, o in zip(samples, outs)]
    return [sample_sequence(s) for s in samples]


def records_for(target, samples: list[Sample], *, m_star: int, regenerate: int | None = None, prepare=None):
    """Feature records of a list of samples (one padded target batch)."""
    from sparrow_jax.models.registry import prepare_batch_for  # noqa: PLC0415

    prepare = prepare or prepare_batch_for(target.cfg)
    seqs = _sequences(target, samples, regenerate, prepare)
    batch = prepare([s for s, _ in seqs], target.cfg)
    graphdef, params = nnx.split(target)
    h, hprev, vis = (np.asarray(x, np.float32) for x in _features_jit(graphdef, params, batch, m_star))
    out = []
    for b, (seq, assistant) in enumerate(seqs):
        is_vis = np.asarray(seq.mm_token_type_ids) != 0
        text_pos, pred, vis_pos = text_layout(is_vis, assistant)
        L, M = len(text_pos), len(vis_pos)
        out.append(FeatureRecord(text_ids=np.asarray(seq.input_ids)[text_pos].astype(np.int32), pred_mask=pred,
                                 h=h[b, :L], hprev=hprev[b, :L], vis=vis[b, :M], is_vis=is_vis))
    return out


def extract_features(target, samples: list[Sample], out_dir, *, m_star: int, batch_size: int = 8,
                     shard_size: int = 64, regenerate: int | None = None, prepare=None, progress: bool = True) -> dict:
    """Offline extraction into `out_dir` (safetensors shards + index.json). Resumable: shards already
    in the index are skipped."""
    from tqdm import tqdm  # noqa: PLC0415

    out_dir = Path(out_dir)
    index = read_index(out_dir) or {"shards": []}
    done = {s["file"] for s in index["shards"]}
    meta = {"m_star": m_star, "hidden_size": target.cfg.text.hidden_size, "family": target.cfg.family,
            "num_samples": len(samples), "shard_size": shard_size, "regenerate": regenerate}
    n_shards = -(-len(samples) // shard_size)
    for k in tqdm(range(n_shards), desc="extracting features", disable=not progress, unit="shard"):
        if f"features-{k:05d}.safetensors" in done:
            continue
        chunk = samples[k * shard_size:(k + 1) * shard_size]
        recs = []
        for i in range(0, len(chunk), batch_size):
            recs += records_for(target, chunk[i:i + batch_size], m_star=m_star, regenerate=regenerate, prepare=prepare)
        index = write_shard(out_dir, k, recs, meta)
    return index


# ------------------------------------------------------------------------------------- online mode


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class OnlineBatch:
    """Raw inputs for the in-step target plus the draft slots (features filled on device)."""

    prefill: tg.PrefillBatch  # text_idx_BL / vis_idx_BM padded to the training L / M
    train: TrainBatch  # h / hprev / vis are zeros until `fill_features`


def online_batch(samples: list[Sample], target_cfg, *, L: int, M: int, ivsb: bool, prepare=None) -> OnlineBatch:
    from sparrow_jax.models.registry import prepare_batch_for  # noqa: PLC0415

    seqs = [sample_sequence(s) for s in samples]
    batch = (prepare or prepare_batch_for(target_cfg))([s for s, _ in seqs], target_cfg)
    B = len(seqs)
    text_idx, vis_idx = np.zeros((B, L), np.int32), np.zeros((B, M), np.int32)
    recs = []
    for b, (seq, assistant) in enumerate(seqs):
        is_vis = np.asarray(seq.mm_token_type_ids) != 0
        tp, pred, vp = text_layout(is_vis, assistant)
        if len(tp) > L or len(vp) > M:
            raise ValueError(f"sample {b}: {len(tp)} text / {len(vp)} visual positions exceed max_text {L} / max_visual {M}")
        text_idx[b, :len(tp)], vis_idx[b, :len(vp)] = tp, vp
        D = 1  # placeholder features, replaced on device
        recs.append(FeatureRecord(np.asarray(seq.input_ids)[tp].astype(np.int32), pred, np.zeros((len(tp), D)),
                                  np.zeros((len(tp), D)), np.zeros((len(vp), D)), is_vis))
    train = collate(recs, L=L, M=M, ivsb=ivsb)
    D = target_cfg.text.hidden_size
    train = dataclasses.replace(train, h_BLD=np.zeros((B, L, D), np.float32), hprev_BLD=np.zeros((B, L, D), np.float32),
                                vis_BMD=np.zeros((B, M, D), np.float32))
    prefill = dataclasses.replace(batch, text_idx_BL=jnp.asarray(text_idx), vis_idx_BM=jnp.asarray(vis_idx))
    return OnlineBatch(prefill, jax.tree.map(jnp.asarray, train))


def fill_features(target, ob: OnlineBatch, m_star: int) -> TrainBatch:
    """Device: run the frozen target and place its features into the training batch (padding rows
    of the text/visual index point at position 0 and are masked by the loss)."""
    h, hprev, vis = target_features(target, ob.prefill, m_star)
    h, hprev, vis = (jax.lax.stop_gradient(x.astype(jnp.float32)) for x in (h, hprev, vis))
    return dataclasses.replace(ob.train, h_BLD=h, hprev_BLD=hprev, vis_BMD=vis)

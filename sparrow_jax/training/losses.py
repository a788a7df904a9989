"""Draft training objective: the view's slot sequence (IVSB for Sparrow), MTP recursive passes, soft CE +
SmoothL1.

Pass 0 feeds the target's states: text slot t gets z_t = FC([RMSNorm(e_t); h_{t-1}]), a visual slot gets
the visual state of its view, not through FC (IVSB / ivsb_mid: the target's layer-m* state of that
visual token; msd / pruned: the target's input embedding of it) — per slot exactly what the engine's
draft prefill computes (`engine.draft_sequence`). Pass k >= 1 replaces h_{t-1} with the draft's own
pass-(k-1) output at the previous slot, ĥ_{t-1} (shift by one; the first slot keeps the target's h0,
there is no slot before it), visual slots fixed: z_rec = h_vis ⊕ FC([RMSNorm(e_txt); ĥ_txt]) — what
the draft sees deeper in a tree.
At every pass the output at text slot t is trained toward h_t (SmoothL1, weight v_w) and toward the
target's next-token distribution softmax(lm_head(h_t)) (soft cross-entropy, weight p_w).

Bridge dropout (`bridge_dropout` p, ivsb_mid layout only): each row, with probability p per step, sees no
bridge — its visual slots are taken out of the draft's attention (as keys, for every pass) and its text
slots packed in front, so the row trains exactly in the decode view (view none): IVSB's bridged visual
states are otherwise a shortcut the draft cannot take at inference (VATA).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from sparrow_jax.models import attention as attn_lib
from sparrow_jax.models.attention import XLA, AttentionImpl
from sparrow_jax.training.data import TrainBatch


@dataclasses.dataclass(frozen=True)
class LossConfig:
    ivsb: bool = True
    mtp_steps: int = 2  # extra recursive passes K (0 = plain EAGLE-style training)
    mtp_decay: float = 0.8  # pass k weight = decay**k
    p_w: float = 0.1  # soft cross-entropy weight (EAGLE)
    v_w: float = 1.0  # SmoothL1 on hidden states
    noise_std: float = 0.0  # uniform noise on h_{t-1}; EAGLE uses 0.2 * 512 / seq_len
    bridge_dropout: float = 0.0  # probability that a row trains without IVSB's bridge (decode view)

    def __post_init__(self):
        if not 0.0 <= self.bridge_dropout <= 1.0:
            raise ValueError(f"LossConfig.bridge_dropout: a probability in [0, 1], got {self.bridge_dropout}")
        if self.bridge_dropout > 0 and not self.ivsb:
            raise ValueError(f"LossConfig.bridge_dropout {self.bridge_dropout} drops IVSB's bridge: it needs ivsb=True")

    def pass_weights(self):
        return [self.mtp_decay**k for k in range(self.mtp_steps + 1)]


def _gather(x_BND, idx_BM):
    return jnp.take_along_axis(x_BND, idx_BM[..., None], axis=1)


def slot_inputs(draft, e_BLD, hprev_BLD, batch: TrainBatch):
    """Draft inputs per slot: HSR z_t on text slots, the view's visual state on visual slots."""
    z_BLD = draft.hsr_input(e_BLD, hprev_BLD)
    sources = jnp.concatenate([z_BLD, batch.vis_BMD.astype(z_BLD.dtype)], axis=1)
    return _gather(sources, batch.slot_src_BS)


def drop_bridge(batch: TrainBatch, keep_B) -> TrainBatch:
    """The ivsb_mid batch with the visual slots of every row where `keep_B` is False removed: its text
    slots packed in order at the front (their positions are already the compacted text indices), slot
    length = its text count, the visual slots moved past it, so the kv-length mask hides them as keys on
    every attention path (xla, blockwise, pallas). Such a row is the decode view's (view none) up to
    padding; rows with keep True are unchanged."""
    S = batch.slot_src_BS.shape[1]
    L = batch.text_slot_BL.shape[1]
    real_BS = jnp.arange(S)[None] < batch.slot_len_B[:, None]
    drop_BS = ~keep_B[:, None] & ~batch.slot_is_text_BS
    # Stable sort: real (kept) slots first in their order, then dropped visual slots, then padding.
    order_BS = jnp.argsort(jnp.where(real_BS, drop_BS.astype(jnp.int32), 2), axis=1, stable=True)
    n_text_B = (batch.slot_is_text_BS & real_BS).sum(1).astype(batch.slot_len_B.dtype)
    idx_L = jnp.arange(L, dtype=batch.text_slot_BL.dtype)[None]
    packed_text_slot_BL = jnp.where(idx_L < n_text_B[:, None], idx_L, 0)

    def take(x_BS):
        return jnp.where(keep_B[:, None], x_BS, jnp.take_along_axis(x_BS, order_BS, axis=1))

    return dataclasses.replace(
        batch, slot_src_BS=take(batch.slot_src_BS), slot_is_text_BS=take(batch.slot_is_text_BS),
        slot_pos_BS=take(batch.slot_pos_BS), slot_len_B=jnp.where(keep_B, batch.slot_len_B, n_text_B),
        text_slot_BL=jnp.where(keep_B[:, None], batch.text_slot_BL, packed_text_slot_BL))


def draft_passes(draft, embed_fn, batch: TrainBatch, cfg: LossConfig, noise_key=None, impl: AttentionImpl = XLA,
                 all_slots: bool = False):
    """Outputs at the text slots for every pass: list of [B, L, D] (`all_slots`: at every slot, [B, S, D]).
    `impl`: the attention implementation (xla or pallas: both differentiable at any slot count).
    `noise_key` (training; None = no noise, no bridge dropout) also draws the rows that lose the bridge."""
    if cfg.bridge_dropout > 0 and noise_key is not None:  # p = 0: the key and batch are untouched
        noise_key, bridge_key = jax.random.split(noise_key)
        keep_B = ~jax.random.bernoulli(bridge_key, cfg.bridge_dropout, batch.slot_len_B.shape)
        batch = drop_bridge(batch, keep_B)
    e = embed_fn(batch.tok_BL)
    hprev = batch.hprev_BLD.astype(e.dtype)
    if cfg.noise_std > 0 and noise_key is not None:
        a = cfg.noise_std * jnp.sqrt(3.0)  # uniform(-a, a) has std noise_std
        hprev = hprev + jax.random.uniform(noise_key, hprev.shape, hprev.dtype, -a, a)
    mask = attn_lib.MaskSpec(kv_len_B=batch.slot_len_B, causal=True)
    outs = []
    for k in range(cfg.mtp_steps + 1):
        x = slot_inputs(draft, e, hprev, batch)
        y_BSD, _ = draft.run_layers(x, batch.slot_pos_BS, mask, impl=impl)
        outs.append(y_BSD if all_slots else _gather(y_BSD, batch.text_slot_BL))
        # Next pass: h_{t-1} <- ĥ at the previous slot (the first slot keeps h0).
        prev_slot = jnp.maximum(batch.text_slot_BL - 1, 0)
        hprev = jnp.where((batch.text_slot_BL > 0)[..., None], _gather(y_BSD, prev_slot), hprev)
    return outs


def draft_loss(draft, embed_fn, head_fn, batch: TrainBatch, cfg: LossConfig, noise_key=None, impl: AttentionImpl = XLA):
    """Scalar loss and metrics per pass (loss, soft CE, SmoothL1, top-1 agreement with the target)."""
    outs = draft_passes(draft, embed_fn, batch, cfg, noise_key, impl)
    w = batch.pred_BL
    denom = jnp.maximum(w.sum(), 1.0)
    target_logits = head_fn(batch.h_BLD).astype(jnp.float32)
    p = jax.nn.softmax(target_logits, -1)
    target_top1 = jnp.argmax(target_logits, -1)
    total, metrics = 0.0, {}
    for k, (y, wk) in enumerate(zip(outs, cfg.pass_weights())):
        logits = head_fn(y).astype(jnp.float32)
        ce = -(p * jax.nn.log_softmax(logits, -1)).sum(-1)
        l1 = optax.huber_loss(y.astype(jnp.float32), batch.h_BLD.astype(jnp.float32), delta=1.0).mean(-1)
        ce_m, l1_m = (ce * w).sum() / denom, (l1 * w).sum() / denom
        loss_k = cfg.p_w * ce_m + cfg.v_w * l1_m
        total = total + wk * loss_k
        metrics[f"pass{k}/loss"] = loss_k
        metrics[f"pass{k}/ce"] = ce_m
        metrics[f"pass{k}/smooth_l1"] = l1_m
        metrics[f"pass{k}/top1"] = ((jnp.argmax(logits, -1) == target_top1) * w).sum() / denom
    metrics["loss"] = total
    return total, metrics

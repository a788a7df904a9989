"""A few optimiser steps that make a random draft agree with its target (tests need a draft that is
accepted often, to exercise multi-token acceptance). Teacher forcing on the target's own greedy
continuations; loss = soft cross-entropy to the target's next-token distribution + SmoothL1 on hidden."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sparrow_jax.decoding.autoregressive import generate as ar_generate
from sparrow_jax.decoding.engine import draft_positions
from sparrow_jax.models import attention as attn_lib
from sparrow_jax.models import target as tg
from sparrow_jax.models.qwen2_5_vl import prepare_prefill_batch


def _extend(p, tokens):
    q = dataclasses.replace(p) if dataclasses.is_dataclass(p) else type(p)(**vars(p))
    q.input_ids = np.concatenate([p.input_ids, np.asarray(tokens, np.int32)])
    q.mm_token_type_ids = np.concatenate([p.mm_token_type_ids, np.zeros(len(tokens), np.int32)])
    return q


def distill(target, draft, prompts, *, continuation=24, steps=60, lr=3e-3, seed=0):
    conts = ar_generate(target, prompts, max_new_tokens=continuation, eos_ids=())
    seqs = [_extend(p, c) for p, c in zip(prompts, conts)]
    batch = prepare_prefill_batch(seqs, target.cfg)
    idx, dlen, _ = draft_positions(seqs, "text_only", batch.input_ids_BT.shape[1])
    batch = dataclasses.replace(batch, draft_idx_BP=idx, draft_len_B=dlen)
    tgraph, tparams = nnx.split(target)
    pre = tg.prefill(tgraph, tparams, batch, capacity=batch.input_ids_BT.shape[1], m_star=1)
    # Target at the same positions: h_t (what the draft output should match) and its logits.
    h_t = tg._gather_rows(_final_hidden(target, batch), idx)
    p_t = jax.nn.softmax(target.logits(h_t), -1)
    valid = (jnp.arange(idx.shape[1])[None] < dlen[:, None]).astype(jnp.float32)
    e, hprev = pre.draft_e_BPD, pre.draft_hprev_BPD
    pos = jnp.broadcast_to(jnp.arange(idx.shape[1])[None], idx.shape)
    mask = attn_lib.MaskSpec(kv_len_B=dlen, causal=True)
    head = nnx.split(target)  # frozen, closed over

    dgraph, dparams = nnx.split(draft)
    opt = optax.adam(lr)
    opt_state = opt.init(dparams)

    def loss_fn(dp):
        d = nnx.merge(dgraph, dp)
        out, _ = d(e, hprev, pos, mask)
        logq = jax.nn.log_softmax(nnx.merge(*head).logits(out), -1)
        ce = -(p_t * logq).sum(-1)
        l1 = optax.huber_loss(out, h_t).mean(-1)
        return ((0.1 * ce + l1) * valid).sum() / valid.sum() + ((ce * valid).sum() / valid.sum())

    @jax.jit
    def step(dp, st):
        loss, g = jax.value_and_grad(loss_fn)(dp)
        upd, st = opt.update(g, st, dp)
        return optax.apply_updates(dp, upd), st, loss

    for _ in range(steps):
        dparams, opt_state, loss = step(dparams, opt_state)
    nnx.update(draft, dparams)
    return float(loss)


def _final_hidden(target, batch):
    h, _, _ = tg.forward(target, batch)
    return h

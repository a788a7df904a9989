"""Autoregressive generation on the target speculation API: the baseline every speedup is measured
against. Each step is `verify` with a one-node block and `commit` of that node — the same code path
the speculative engine uses, so AR and speculative runs differ only in the draft.

The whole generation is one jitted `lax.while_loop`; rows stop independently (EOS / max tokens).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from sparrow_jax.decoding import streaming
from sparrow_jax.decoding.placement import Placement, put
from sparrow_jax.decoding.sampling import SamplingArrays, SamplingParams, as_sampling, select_tokens
from sparrow_jax.models import registry
from sparrow_jax.models import target as tg
from sparrow_jax.models.attention import XLA, AttentionImpl
from sparrow_jax.models.kv_cache import KVCache, commit
from sparrow_jax.runtime import graph_jit
from sparrow_jax.training.sharding import RULES


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GenerationResult:
    tokens_BM: jax.Array  # generated tokens, row b valid up to num_tokens_B[b] (EOS included)
    num_tokens_B: jax.Array
    cache: KVCache
    steps: jax.Array  # tokens picked (loop iterations); the target made steps - 1 forward passes


def _is_eos(tok_B, eos_ids):
    if not eos_ids:
        return jnp.zeros(tok_B.shape, bool)
    return jnp.isin(tok_B, jnp.asarray(eos_ids, jnp.int32))


def ar_generate(graphdef, params, cache: KVCache, last_logits_BV, rope_delta_B, key, *, max_new_tokens: int,
                sampling=None, eos_ids: tuple[int, ...] = (), impl: AttentionImpl = XLA, on_emit=None,
                key_visible_LBS=None, placement: Placement | None = None) -> GenerationResult:
    """Generate up to `max_new_tokens` per row after `prefill` (its cache, last logits and rope delta).
    The cache must have room for them (`cache_capacity`); it is donated. `sampling`: None (greedy),
    SamplingParams (one for all rows or one per row) or SamplingArrays; changing its values reuses the
    compiled loop. `on_emit(tokens [B, 1], counts [B])` is an optional host hook for streaming (a
    device->host transfer per step). key_visible_LBS [layers, B, capacity]: the internalization study's
    visual-KV removal (`target.visual_key_visibility`), applied at every step. `placement`: run
    tensor-parallel on its mesh (`sharded_ar_loop`); None: one device."""
    sampling = as_sampling(sampling, last_logits_BV.shape[0])
    static = dict(max_new_tokens=max_new_tokens, eos_ids=tuple(eos_ids), impl=impl)
    with streaming.hooked(on_emit) as emit_id:
        if placement is None:
            return ar_loop(graphdef, params, cache, last_logits_BV, rope_delta_B, key, sampling, emit_id,
                           key_visible_LBS, **static)
        placement.check_rows(last_logits_BV.shape[0])
        loop, ins = sharded_ar_loop(graphdef, placement, **static)
        return loop(*put((params, cache, last_logits_BV, rope_delta_B, key, sampling, emit_id, key_visible_LBS), ins))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ARState:
    """What `ar_loop`'s while_loop carries from step to step: the tokens picked so far and the one
    picked last, whose forward pass (and commit) the next iteration runs."""

    cache: KVCache
    tok_B: jax.Array  # the token picked last, not yet in the cache
    commit_B: jax.Array  # rows whose tok_B goes into the cache (those still generating when it was picked)
    tokens_BM: jax.Array  # generated tokens, row b valid up to n_B[b]
    n_B: jax.Array
    done_B: jax.Array
    step: jax.Array  # tokens picked (loop iterations, the first pick included)
    key: jax.Array


@graph_jit(graphs=("graphdef",), static_argnames=("graphdef", "max_new_tokens", "eos_ids", "impl"),
           donate_argnames=("cache",))
def ar_loop(graphdef, params, cache: KVCache, last_logits_BV, rope_delta_B, key, sampling: SamplingArrays | None = None,
            emit_id=None, key_visible_LBS=None, *, max_new_tokens: int, eos_ids: tuple[int, ...] = (),
            impl: AttentionImpl = XLA) -> GenerationResult:
    """The jitted loop behind `ar_generate` (sampling and the streaming hook id are traced). Each
    iteration runs the forward of the token picked last and picks the next; the first pick (from the
    prefill's logits) precedes the loop, so the token that finishes the last row costs no forward and
    the loop needs no conditional around the forward (a `lax.cond` returning the cache gives XLA one more
    reason to copy it; see `body` for the one that did)."""
    model = nnx.merge(graphdef, params)
    B = last_logits_BV.shape[0]
    one_node = jnp.ones((B, 1, 1), bool)

    def pick(s: ARState, logits_BV) -> ARState:
        key, sub = jax.random.split(s.key)
        tok_B = select_tokens(sub, logits_BV, sampling)
        active = ~s.done_B
        at_B = jnp.minimum(s.n_B, max_new_tokens - 1)
        out = s.tokens_BM.at[jnp.arange(B), at_B].set(jnp.where(active, tok_B, s.tokens_BM[jnp.arange(B), at_B]))
        n = s.n_B + active
        streaming.emit(emit_id, tok_B[:, None], active.astype(jnp.int32))
        done = s.done_B | (active & _is_eos(tok_B, eos_ids)) | (n >= max_new_tokens)
        return dataclasses.replace(s, tok_B=tok_B, commit_B=active, tokens_BM=out, n_B=n, done_B=done,
                                   step=s.step + 1, key=key)

    def cond(s: ARState):
        return (s.step < max_new_tokens) & ~jnp.all(s.done_B)

    def body(s: ARState) -> ARState:
        pos_B1 = (s.cache.lengths_B + rope_delta_B)[:, None]
        v = tg.verify_fn(model, s.cache, s.tok_B[:, None], pos_B1, one_node, impl, key_visible_LBS)
        nxt = pick(s, v.logits_BNV[:, 0])
        # Commit the forwarded token. Its block index (always 0) is read from the token just picked, so
        # the cache writes depend on this step's logits, i.e. come after every layer's read of the cache:
        # XLA then updates the cache in place. With a constant index it copies each layer's K and V
        # every step (2 copies per array: 24 whole-cache copies per step for 6 layers, in the optimised
        # HLO; the speculative loop's index is the accepted path, which depends on the logits already).
        idx_B1 = jnp.minimum(nxt.tok_B, 0)[:, None]
        cache = commit(s.cache, v.block_kv, idx_B1, s.commit_B.astype(jnp.int32))
        return dataclasses.replace(nxt, cache=cache)

    s = ARState(cache=cache, tok_B=jnp.zeros((B,), jnp.int32), commit_B=jnp.zeros((B,), bool),
                tokens_BM=jnp.zeros((B, max_new_tokens), jnp.int32), n_B=jnp.zeros((B,), jnp.int32),
                done_B=jnp.zeros((B,), bool), step=jnp.int32(0), key=key)
    if max_new_tokens > 0:
        s = jax.lax.while_loop(cond, body, pick(s, last_logits_BV))
    return GenerationResult(s.tokens_BM, s.n_B, s.cache, s.step)


@functools.lru_cache(maxsize=32)
def sharded_ar_loop(graphdef, placement: Placement, *, max_new_tokens: int, eos_ids: tuple[int, ...] = (),
                    impl: AttentionImpl = XLA):
    """`ar_loop` on `placement`'s mesh, still one jitted call: parameters from their declared axes, the
    cache split by row and KV head (donated), row arrays by row. (jitted fn of the loop's arguments
    after the graph, in_shardings)."""
    rows, rep, cache_s = placement.rows, placement.replicated, placement.target_cache
    # params, cache, last_logits, rope_delta, key, sampling, emit_id, key_visible_LBS [L, B, S]
    ins = (placement.target_params, cache_s, rows, rows, rep, rows, rep, placement.named(P(None, RULES["batch"])))

    def loop(params, cache, last_logits_BV, rope_delta_B, key, sampling, emit_id, key_visible_LBS):
        return ar_loop(graphdef, params, cache, last_logits_BV, rope_delta_B, key, sampling, emit_id, key_visible_LBS,
                       max_new_tokens=max_new_tokens, eos_ids=eos_ids, impl=impl)
    return jax.jit(loop, in_shardings=ins, out_shardings=GenerationResult(rows, rows, cache_s, rep),
                   donate_argnums=(1,)), ins


def cache_capacity(prompt_len: int, max_new_tokens: int, slack: int = 1) -> int:
    """Cache slots for a prompt bucket, its generated tokens and `slack` more (what a round writes past
    the committed length; AR needs 1, the speculative engine `EngineConfig.cache_slack`), bucketed. The
    one capacity rule: AR runs timed against speculative ones pass the same slack, since dense attention
    scans the whole capacity."""
    return tg.bucket(prompt_len + max_new_tokens + slack)


def generate(model, prompts, *, max_new_tokens: int, sampling: SamplingParams | None = None, seed: int = 0,
             eos_ids=None, m_star: int | None = None, impl: AttentionImpl = XLA, prepare=None):
    """Convenience host wrapper: prompts -> list of generated token lists (EOS included)."""
    cfg = model.cfg
    batch = (prepare or registry.prepare_batch_for(cfg))(prompts, cfg)
    tg.check_context(batch, cfg.text, max_new_tokens)
    graphdef, params = nnx.split(model)
    T = batch.input_ids_BT.shape[1]
    pre = tg.prefill(graphdef, params, batch, capacity=cache_capacity(T, max_new_tokens),
                     m_star=tg.default_m_star(cfg.num_layers) if m_star is None else m_star, impl=impl)
    eos = tuple(cfg.eos_token_ids if eos_ids is None else eos_ids)
    res = ar_generate(graphdef, params, pre.cache, pre.last_logits_BV, pre.rope_delta_B, jax.random.key(seed), max_new_tokens=max_new_tokens, sampling=sampling,
                      eos_ids=eos, impl=impl)
    toks, n = np.asarray(res.tokens_BM), np.asarray(res.num_tokens_B)
    return [toks[b, :n[b]].tolist() for b in range(len(prompts))]

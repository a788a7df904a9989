"""The decode loops update the KV cache in place: the optimised XLA program of the AR loop and of the
speculative loop contains no copy of a whole per-layer cache array. A copy per step costs O(capacity)
memory traffic, so a step would cost what the capacity bucket costs, not the committed length — and
an AR loop paying copies the speculative loop does not would inflate every DSR measured against it
(it did: 24 copies per step at 6 layers until the AR commit's index depended on the step's logits)."""

import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from sparrow_jax.decoding import autoregressive as AR
from sparrow_jax.decoding import engine as E
from sparrow_jax.decoding.tree import TreeSpec
from sparrow_jax.models import kv_cache, registry
from sparrow_jax.models.draft import DraftConfig, SparrowDraft

CAPACITY = 1152  # not a size any other array of the tiny model has


@pytest.fixture(scope="module")
def tiny():
    cfg = registry.config_from_dict(*registry.read_config_dict("configs/tiny.json"))
    graph, params = nnx.split(registry.build_target(cfg, rngs=nnx.Rngs(0)))
    t = cfg.text
    cache = kv_cache.KVCache.empty(t.num_hidden_layers, 1, CAPACITY, t.num_key_value_heads, t.head_dim, jnp.float32)
    cache = kv_cache.KVCache(cache.k, cache.v, jnp.full((1,), 300, jnp.int32))
    return cfg, graph, params, cache


def cache_ops(hlo: str, cache) -> dict[str, int]:
    """Count the instructions producing an array of the cache's per-layer shape, by opcode."""
    shape = "f32[" + ",".join(map(str, cache.k[0].shape)) + "]"
    ops: dict[str, int] = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%\S+ = (\S+) ([\w-]+)\(", line)
        if m and m.group(1).startswith(shape):
            ops[m.group(2)] = ops.get(m.group(2), 0) + 1
    return ops


def test_ar_loop_updates_the_cache_in_place(tiny):
    cfg, graph, params, cache = tiny
    hlo = AR.ar_loop.lower(graph, params, cache, jnp.zeros((1, cfg.text.vocab_size)), jnp.zeros((1,), jnp.int32),
                           jax.random.key(0), max_new_tokens=9).compile().as_text()
    ops = cache_ops(hlo, cache)
    assert ops.get("dynamic-update-slice", 0) > 0, f"no cache write found: the check is blind ({ops})"
    assert ops.get("copy", 0) == 0, f"AR loop copies whole cache arrays: {ops}"


@pytest.mark.parametrize("tree,draft_capacity", [("chain3", 256), ("8-3-2", 256), ("chain3", 2176)])
def test_speculative_loop_updates_the_cache_in_place(tiny, tree, draft_capacity):
    """Both caches. The draft's is read by the catch-up, written, then read by every tree level; 2176 is a
    visual-view draft's cache of several attention chunks (it had 2 copies per array per round until the
    catch-up commit's indices depended on the catch-up's output)."""
    cfg, graph, params, cache = tiny
    draft = SparrowDraft(DraftConfig.for_target(cfg), rngs=nnx.Rngs(1))
    dgraph, dparams = nnx.split(draft)
    d = draft.cfg
    dcache = kv_cache.KVCache.empty(1, 1, draft_capacity, d.num_key_value_heads,
                                    d.hidden_size // d.num_attention_heads, jnp.float32)
    dcache = kv_cache.KVCache(dcache.k, dcache.v, jnp.full((1,), 200, jnp.int32))
    ecfg = E.EngineConfig(tree=TreeSpec.parse(tree), max_new_tokens=16)
    hlo = E.speculative_loop.lower(graph, params, dgraph, dparams, cache, dcache, jnp.zeros((1, cfg.text.vocab_size)),
                                   jnp.zeros((1, cfg.text.hidden_size)), jnp.zeros((1,), jnp.int32),
                                   jax.random.key(0), cfg=ecfg).compile().as_text()
    for name, c in (("target", cache), ("draft", dcache)):
        ops = cache_ops(hlo, c)
        assert ops.get("dynamic-update-slice", 0) > 0, f"no {name} cache write found: the check is blind ({ops})"
        assert ops.get("copy", 0) == 0, f"speculative loop copies whole {name} cache arrays: {ops}"

"""Target speculation API: prefill / verify / commit are consistent with each other and with a full
forward; tree masks are causal; batched rows equal single rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import _tiny
from sparrow_jax.decoding.autoregressive import generate
from sparrow_jax.models import target as tg
from sparrow_jax.models.qwen2_5_vl import prepare_prefill_batch


@pytest.fixture(scope="module")
def model():
    return _tiny.random_model(seed=3)


@pytest.fixture(scope="module")
def split(model):
    return nnx.split(model)


def _prompt(seed, n_before=5, grid=(2, 4, 6), n_after=3, kind="video"):
    rng = np.random.default_rng(seed)
    return _tiny.prompt([_tiny.random_text(rng, n_before), _tiny.visual(rng, grid, kind), _tiny.random_text(rng, n_after)])


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


def _prefill(model, split, prompts, capacity=256):
    graphdef, params = split
    batch = prepare_prefill_batch(prompts, model.cfg)
    return batch, tg.prefill(graphdef, params, batch, capacity=capacity, m_star=2, states=True)


def test_prefill_outputs_agree_with_forward(model, split):
    p = _prompt(0)
    batch, pre = _prefill(model, split, [p])
    h, _, cap = tg.forward(model, batch, capture=(2,))
    T = len(p.input_ids)
    np.testing.assert_allclose(pre.last_logits_BV[0], model.logits(h)[0, T - 1], atol=1e-5)
    txt = np.nonzero(p.mm_token_type_ids == 0)[0]
    vis = np.nonzero(p.mm_token_type_ids != 0)[0]
    assert int(pre.text_hidden_BLD.shape[1]) >= len(txt)
    np.testing.assert_allclose(pre.text_hidden_BLD[0, :len(txt)], h[0, txt], atol=1e-5)
    np.testing.assert_allclose(pre.vis_hidden_mid_BMD[0, :len(vis)], cap[2][0, vis], atol=1e-5)
    assert int(pre.cache.lengths_B[0]) == T


def test_verify_chain_then_commit_equals_one_at_a_time_and_full_forward(model, split):
    graphdef, params = split
    p = _prompt(1)
    chain = np.asarray([[11, 57, 3, 201, 99]], np.int32)
    N = chain.shape[1]
    _, pre = _prefill(model, split, [p])
    base = pre.cache.lengths_B + pre.rope_delta_B
    # One block, causal chain mask.
    v = tg.verify(graphdef, params, pre.cache, jnp.asarray(chain), base[:, None] + jnp.arange(N)[None],
                  jnp.tril(jnp.ones((N, N), bool)))
    cache_chain = tg.commit(_copy(pre.cache), v.block_kv, jnp.arange(N)[None], jnp.asarray([N]))
    # One token at a time.
    cache = _copy(pre.cache)
    step_logits = []
    for i in range(N):
        vi = tg.verify(graphdef, params, cache, jnp.asarray(chain[:, i:i + 1]),
                       (cache.lengths_B + pre.rope_delta_B)[:, None], jnp.ones((1, 1), bool))
        cache = tg.commit(cache, vi.block_kv, jnp.zeros((1, 1), jnp.int32), jnp.asarray([1]))
        step_logits.append(vi.logits_BNV[:, 0])
    np.testing.assert_allclose(v.logits_BNV[0], jnp.stack(step_logits, 1)[0], atol=1e-5)
    L = int(cache.lengths_B[0])
    assert L == int(cache_chain.lengths_B[0]) == len(p.input_ids) + N
    for a, b in zip(cache_chain.k + cache_chain.v, cache.k + cache.v):
        np.testing.assert_allclose(a[:, :L], b[:, :L], atol=1e-5)
    # The same tokens appended to the prompt and run through the full forward.
    q = _tiny.prompt([])
    q.input_ids = np.concatenate([p.input_ids, chain[0]])
    q.mm_token_type_ids = np.concatenate([p.mm_token_type_ids, np.zeros(N, np.int32)])
    q.visuals = p.visuals
    batch = prepare_prefill_batch([q], model.cfg)
    h, kvs, _ = tg.forward(model, batch)
    T = len(p.input_ids)
    np.testing.assert_allclose(v.logits_BNV[0], model.logits(h)[0, T:T + N], atol=1e-5)
    np.testing.assert_allclose(cache_chain.k[0][0, :L], kvs[0][0][0, :L], atol=1e-5)


def test_tree_mask_causality(model, split):
    """A node's logits depend only on its ancestors: changing non-ancestor tokens changes nothing."""
    graphdef, params = split
    _, pre = _prefill(model, split, [_prompt(2)])
    parent = [-1, 0, 0, 1, 1, 2, 3]
    N = len(parent)
    anc = np.eye(N, dtype=bool)
    depth = np.zeros(N, np.int32)
    for i in range(N):
        j = parent[i]
        while j >= 0:
            anc[i, j] = True
            depth[i] += 1
            j = parent[j]
    pos = (pre.cache.lengths_B + pre.rope_delta_B)[:, None] + jnp.asarray(depth)[None]
    toks = np.asarray([[5, 17, 29, 31, 47, 53, 61]], np.int32)
    base = tg.verify(graphdef, params, pre.cache, jnp.asarray(toks), pos, jnp.asarray(anc)).logits_BNV[0]
    for i in range(N):
        others = np.nonzero(~anc[i])[0]
        if not len(others):
            continue
        t2 = toks.copy()
        t2[0, others] = (t2[0, others] + 100) % 280
        new = tg.verify(graphdef, params, pre.cache, jnp.asarray(t2), pos, jnp.asarray(anc)).logits_BNV[0]
        np.testing.assert_array_equal(np.asarray(new[i]), np.asarray(base[i]))
        changed = np.nonzero(np.abs(np.asarray(new - base)).max(-1) > 1e-4)[0]
        assert set(changed) <= set(others) | {j for j in range(N) if anc[j][others].any()}
    # And an ancestor change does reach the node.
    t3 = toks.copy()
    t3[0, 1] = 200
    new = tg.verify(graphdef, params, pre.cache, jnp.asarray(t3), pos, jnp.asarray(anc)).logits_BNV[0]
    assert np.abs(np.asarray(new[6] - base[6])).max() > 1e-4


def test_batch_of_three_equals_rows_alone(model):
    prompts = [_prompt(10, 4, (2, 4, 6), 3), _prompt(11, 9, (1, 6, 4), 1, kind="image"), _prompt(12, 2, (3, 4, 4), 6)]
    assert len({len(p.input_ids) for p in prompts}) == 3
    together = generate(model, prompts, max_new_tokens=10, eos_ids=())
    alone = [generate(model, [p], max_new_tokens=10, eos_ids=())[0] for p in prompts]
    assert together == alone


def test_eos_stops_each_row(model):
    prompts = [_prompt(20), _prompt(21, 7)]
    free = generate(model, prompts, max_new_tokens=8, eos_ids=())
    eos = free[0][2]  # make row 0's third token an EOS
    stopped = generate(model, prompts, max_new_tokens=8, eos_ids=(eos,))
    assert stopped[0] == free[0][:free[0].index(eos) + 1]
    cut = free[1].index(eos) + 1 if eos in free[1] else 8
    assert stopped[1] == free[1][:cut]

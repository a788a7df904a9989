"""Sampling: the filtered distribution is the documented one, and AR sampling draws from it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import _tiny
from sparrow_jax.decoding.autoregressive import generate
from sparrow_jax.decoding.sampling import SamplingArrays, SamplingParams, target_probs
from sparrow_jax.models import target as tg
from sparrow_jax.models.qwen2_5_vl import prepare_prefill_batch


def _reference_probs(logits, temperature, top_k, top_p):
    """Plain numpy: temperature, keep the top_k largest, then the smallest prefix with mass >= top_p."""
    x = logits / temperature
    if top_k:
        x = np.where(x < np.sort(x)[-top_k], -np.inf, x)
    p = np.exp(x - x.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.zeros_like(p, bool)
    mass = 0.0
    for i in order:
        if mass >= top_p:
            break
        keep[i] = True
        mass += p[i]
    p = np.where(keep, p, 0)
    return p / p.sum()


@pytest.mark.parametrize("t,k,p", [(1.0, 0, 1.0), (0.7, 0, 0.9), (1.3, 5, 1.0), (0.5, 8, 0.8)])
def test_filtered_distribution_matches_reference(t, k, p):
    logits = np.asarray(jax.random.normal(jax.random.key(0), (3, 40))) * 2
    ours = np.asarray(target_probs(jnp.asarray(logits), SamplingParams(t, p, k)))
    for b in range(3):
        np.testing.assert_allclose(ours[b], _reference_probs(logits[b], t, k, p), atol=1e-6)


def test_rows_with_different_settings_get_their_own_distribution_from_one_program():
    """Settings are traced [B] arrays: one jitted call filters each row by its own (t, top_k, top_p),
    a temperature-0 row is one-hot argmax; new values reuse the program."""
    cases = [(1.0, 0, 1.0), (0.7, 0, 0.9), (1.3, 5, 1.0), (0.5, 8, 0.8), (0.0, 3, 0.5)]
    logits = np.asarray(jax.random.normal(jax.random.key(2), (len(cases), 40))) * 2
    probs_of = jax.jit(target_probs)
    ours = np.asarray(probs_of(jnp.asarray(logits), SamplingArrays.rows([SamplingParams(t, p, k) for t, k, p in cases],
                                                                         len(cases))))
    for b, (t, k, p) in enumerate(cases):
        want = np.eye(40)[np.argmax(logits[b])] if t == 0 else _reference_probs(logits[b], t, k, p)
        np.testing.assert_allclose(ours[b], want, atol=1e-6)
    probs_of(jnp.asarray(logits), SamplingArrays.rows(SamplingParams(2.0, 0.3, 1), len(cases)))
    assert probs_of._cache_size() == 1


def test_greedy_is_one_hot_argmax():
    logits = jax.random.normal(jax.random.key(1), (2, 17))
    probs = target_probs(logits, SamplingParams())
    assert np.array_equal(np.argmax(np.asarray(probs), -1), np.argmax(np.asarray(logits), -1))
    assert np.all(np.asarray(probs).sum(-1) == 1)


def test_bad_sampling_params_are_rejected():
    for kw in (dict(temperature=-1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-2)):
        with pytest.raises(ValueError):
            SamplingParams(**kw)


def test_ar_sampling_first_token_follows_target_distribution():
    """Many identical rows in one batch: the first sampled token's histogram fits the filtered softmax
    of the prefill logits (chi-square, p > 0.01)."""
    model = _tiny.random_model(seed=5, scale=1.0)  # flatter logits: many tokens with mass
    rng = np.random.default_rng(0)
    p = _tiny.prompt([_tiny.random_text(rng, 6)])
    sp = SamplingParams(temperature=1.0, top_p=0.9)
    n = 4000
    toks = generate(model, [p] * n, max_new_tokens=1, sampling=sp, seed=7, eos_ids=())
    first = np.asarray([t[0] for t in toks])
    batch = prepare_prefill_batch([p], model.cfg)
    from flax import nnx
    graphdef, params = nnx.split(model)
    pre = tg.prefill(graphdef, params, batch, capacity=128, m_star=1)
    probs = np.asarray(target_probs(pre.last_logits_BV, sp), np.float64)[0]
    probs /= probs.sum()
    support = np.nonzero(probs > 0)[0]
    assert set(first.tolist()) <= set(support.tolist())
    counts = np.bincount(first, minlength=probs.size)[support]
    expected = probs[support] * n
    # Pool rare cells so every expected count is >= 5.
    order = np.argsort(expected)
    big = expected[order] >= 5
    obs = np.append(counts[order][big], counts[order][~big].sum())
    exp = np.append(expected[order][big], expected[order][~big].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    assert len(exp) >= 5
    assert stats.chisquare(obs, exp).pvalue > 0.01

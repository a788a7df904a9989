"""Training at video lengths: the blockwise attention's custom VJP equals the dense gradient (GQA,
causal, per-row lengths, a fully padded row, fp32 and bf16), `jax.grad` of a draft works past the
dense limit, and a trainer step with `attention=pallas` matches `attention=xla`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import _tiny
from sparrow_jax.models import attention as attn_lib
from sparrow_jax.models.attention import MaskSpec, blockwise_attention, dense_attention


def _qkv(seed, B, T, H, K, E, dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 4)
    q, k, v = (jax.random.normal(kk, sh).astype(dtype) for kk, sh in
               zip(ks, [(B, T, H, E), (B, T, K, E), (B, T, K, E)]))
    w = jax.random.normal(ks[3], (B, T, H, E))  # cotangent: a random linear read-out of the output
    return q, k, v, w


def _value_and_grads(fn, q, k, v, w):
    loss = lambda q, k, v: (fn(q, k, v).astype(jnp.float32) * w).sum()  # noqa: E731
    out = fn(q, k, v)
    return out, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


def _rel_err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))


@pytest.mark.parametrize("B,T,H,K,E,causal,lens,qb,kb", [
    (3, 70, 4, 2, 8, True, [70, 45, 0], 16, 32),     # GQA 2, causal, a short row and a fully padded row
    (2, 100, 6, 1, 16, True, [100, 37], 64, 16),     # MQA, blocks not dividing T
    (3, 50, 4, 4, 8, False, [50, 1, 0], 32, 16),     # bidirectional (vision segments), per-row lengths
    (2, 96, 4, 2, 8, True, [96, 96], 16, 16),        # full rows: most key blocks are seen whole (no mask)
    (2, 64, 4, 2, 8, False, [64, 60], 8, 16),         # bidirectional, blocks inside every length whole
])
def test_blockwise_forward_and_gradient_equal_dense(B, T, H, K, E, causal, lens, qb, kb):
    q, k, v, w = _qkv(0, B, T, H, K, E)
    mask = MaskSpec(kv_len_B=jnp.asarray(lens, jnp.int32), causal=causal)
    o_d, g_d = _value_and_grads(lambda q, k, v: dense_attention(q, k, v, mask), q, k, v, w)
    o_b, g_b = _value_and_grads(lambda q, k, v: blockwise_attention(q, k, v, mask, q_block=qb, kv_block=kb),
                                q, k, v, w)
    assert _rel_err(o_b, o_d) <= 1e-5
    for name, gb, gd in zip("qkv", g_b, g_d):
        assert np.isfinite(np.asarray(gb)).all(), name
        assert _rel_err(gb, gd) <= 1e-4, (name, _rel_err(gb, gd))
    for b in np.nonzero(np.asarray(lens) == 0)[0]:  # no visible key: output 0 and zero gradients, not NaN
        assert not np.asarray(o_b)[b].any()
        for name, gb in zip("qkv", g_b):
            assert not np.asarray(gb)[b].any(), name


def test_blockwise_bf16_inputs_accumulate_in_fp32():
    B, T, H, K, E = 2, 96, 4, 2, 16
    q, k, v, w = _qkv(1, B, T, H, K, E, jnp.bfloat16)
    mask = MaskSpec(kv_len_B=jnp.asarray([96, 40], jnp.int32), causal=True)
    up = lambda x: x.astype(jnp.float32)  # noqa: E731  the fp32 reference sees the same (rounded) inputs
    o_ref, g_ref = _value_and_grads(lambda q, k, v: dense_attention(up(q), up(k), up(v), mask), q, k, v, w)
    o_b, g_b = _value_and_grads(lambda q, k, v: blockwise_attention(q, k, v, mask, q_block=32, kv_block=16),
                                q, k, v, w)
    assert o_b.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in g_b)
    assert _rel_err(o_b, o_ref) <= 1e-2  # bf16 output rounding (2^-8) with fp32 accumulation
    for name, gb, gr in zip("qkv", g_b, g_ref):
        assert _rel_err(gb, gr) <= 2e-2, (name, _rel_err(gb, gr))


def test_blockwise_causality_by_gradient():
    """Key/value gradients of query i's output are exactly zero for keys after i."""
    q, k, v, _ = _qkv(2, 1, 40, 4, 2, 8)
    mask = MaskSpec(kv_len_B=jnp.asarray([40]), causal=True)
    i = 17
    g_k, g_v = jax.grad(lambda k, v: blockwise_attention(q, k, v, mask, q_block=8, kv_block=8)[0, i].sum(),
                        argnums=(0, 1))(k, v)
    assert not np.asarray(g_k)[0, i + 1:].any() and not np.asarray(g_v)[0, i + 1:].any()
    assert np.abs(np.asarray(g_v)[0, : i + 1]).sum() > 0


@pytest.mark.slow
def test_draft_gradient_past_the_dense_limit(monkeypatch):
    """The issue's reproduction: `jax.grad` of a 4-head draft's `run_layers` at 3,000 slots (past
    DENSE_SCORE_LIMIT, so `attention` takes the blockwise path) used to raise; it now equals the
    gradient of the same draft with the dense path forced."""
    from sparrow_jax.models.draft import DraftConfig, SparrowDraft

    T, H = 3000, 4
    assert H * T * T > attn_lib.DENSE_SCORE_LIMIT
    draft = SparrowDraft(DraftConfig(hidden_size=32, intermediate_size=64, num_attention_heads=H, num_key_value_heads=2,
                                     vocab_size=64), rngs=nnx.Rngs(0))
    graph, params = nnx.split(draft, nnx.Param)
    ks = jax.random.split(jax.random.key(3), 2)
    x = jax.random.normal(ks[0], (1, T, 32))
    w = jax.random.normal(ks[1], (1, T, 32))
    pos = jnp.arange(T)[None]
    mask = MaskSpec(kv_len_B=jnp.asarray([T - 123], jnp.int32), causal=True)  # a padded tail

    def loss(params, x):
        y, _ = nnx.merge(graph, params).run_layers(x, pos, mask)
        return (y * w).sum()

    grad = lambda: jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)  # noqa: E731
    l_b, (gp_b, gx_b) = grad()
    monkeypatch.setattr(attn_lib, "DENSE_SCORE_LIMIT", 1 << 62)
    l_d, (gp_d, gx_d) = grad()
    assert abs(float(l_b) - float(l_d)) <= 1e-4 * max(1.0, abs(float(l_d)))
    assert _rel_err(gx_b, gx_d) <= 1e-4
    for path, gb in nnx.to_flat_state(gp_b):
        gd = dict(nnx.to_flat_state(gp_d))[path]
        assert _rel_err(gb[...], gd[...]) <= 1e-4, (path, _rel_err(gb[...], gd[...]))


def test_pallas_fallback_is_differentiable_and_logged(caplog):
    """Shapes the Pallas prefill kernel cannot take go to the XLA path (reason logged once), which
    trains too: the differentiated program calls the fallback, forward and backward, and no kernel."""
    from pallas_kernels import common as C
    from pallas_kernels import dispatch

    q, k, v, w = _qkv(4, 2, 24, 4, 2, 8)
    mask = MaskSpec(kv_len_B=jnp.asarray([24, 10], jnp.int32), causal=True)
    impl = attn_lib.AttentionImpl.pallas(backend=C.Backend("tpu", interpret=True), vmem_budget_bytes=0)
    fn = lambda q, k, v: attn_lib.attention(q, k, v, mask, impl=impl)  # noqa: E731
    with caplog.at_level("WARNING", logger="pallas_kernels"):
        assert dispatch.route(q, k, v, mask, config=impl.blocks)[0] == "xla"
        _, g_p = _value_and_grads(fn, q, k, v, w)
    assert "VMEM budget" in caplog.text
    grad = jax.jit(jax.grad(lambda q, k, v: (fn(q, k, v) * w).sum(), argnums=(0, 1, 2)))
    assert dispatch.routes_in(grad.lower(q, k, v)) == {"xla": 2}
    _, g_d = _value_and_grads(lambda q, k, v: dense_attention(q, k, v, mask), q, k, v, w)
    for gp, gd in zip(g_p, g_d):
        assert _rel_err(gp, gd) <= 1e-5


# ----------------------------------------------------------------------------------- the trainer


@pytest.mark.slow
def test_trainer_step_pallas_matches_xla(small_target, tmp_path, monkeypatch):
    """One online `Trainer` step (IVSB, MTP 2) with `attention=pallas` (the prefill kernel, interpret
    mode on CPU) equals `attention=xla`: metrics and gradients. The optimizer is replaced by the
    identity, so the step's parameter change is exactly the gradient."""
    import json

    import optax

    from pallas_kernels import dispatch
    from sparrow_jax.synthetic.samples import synthetic_samples
    from sparrow_jax.training import trainer as trainer_lib

    monkeypatch.setattr(trainer_lib, "make_optimizer", lambda cfg: optax.identity())
    target_json = tmp_path / "target.json"
    target_json.write_text(json.dumps(_tiny.SMALL_VOCAB_CONFIG))
    samples = synthetic_samples(small_target.cfg, 2, seed=5, text_vocab=_tiny.SMALL_TEXT_VOCAB)
    base = [f"target_config={target_json}", "target_seed=7", "online=true", "max_text=32", "max_visual=16",
            "global_batch=2", "mtp_steps=2", "ivsb=true", "log_every=1", "save_every=100", "async_save=false",
            "tensorboard=false"]
    with pytest.raises(ValueError, match="attention 'flash'"):
        trainer_lib.TrainConfig.from_file_and_overrides(None, base + ["attention=flash"])
    metrics, grads, routes = {}, {}, {}
    for impl in ("xla", "pallas"):
        cfg = trainer_lib.TrainConfig.from_file_and_overrides(None, base + [f"attention={impl}",
                                                                            f"out_dir={tmp_path / impl}"])
        tr = trainer_lib.Trainer(cfg, samples=samples, log=lambda *a: None)
        routes[impl] = dispatch.routes_in(tr.lower_step(tr.next_batch()))
        before = jax.device_get(tr.params)
        (metrics[impl],) = tr.run(1, resume=False, progress=False)
        grads[impl] = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), jax.device_get(tr.params), before)
    # pallas: every draft attention call is the prefill kernel, forward and backward (never the fallback):
    # one forward per draft layer and pass (pass 0 + 2 MTP passes), each with its backward
    assert routes == {"xla": {}, "pallas": {"prefill": 2 * 3 * cfg.draft_layers}}, routes
    for key, x in metrics["xla"].items():
        if key != "step_s":
            assert abs(metrics["pallas"][key] - x) <= 1e-4 * max(1.0, abs(x)), key
    for (path, gx), (_, gp) in zip(nnx.to_flat_state(grads["xla"]), nnx.to_flat_state(grads["pallas"])):
        assert np.abs(gx[...]).max() > 0 or path[-1] == "bias", path
        assert _rel_err(gp[...], gx[...]) <= 1e-4, (path, _rel_err(gp[...], gx[...]))

"""Visual-KV removal from decoder layer x on (`target.visual_key_visibility`, the internalization study's
per-layer key mask): x = L is the normal forward and generation exactly; x = 0 is a forward in which the
text never sees a visual key (the text-only subsequence at its own positions); cached greedy decoding
under the mask agrees with the masked full forward."""

import types
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import _tiny
from sparrow_jax.decoding.autoregressive import ar_generate, cache_capacity
from sparrow_jax.decoding.sampling import SamplingParams
from sparrow_jax.models import attention as attn_lib
from sparrow_jax.models import target as tg
from sparrow_jax.models.qwen2_5_vl import prepare_prefill_batch

NEW = 6


@pytest.fixture(scope="module")
def model():
    return _tiny.random_model(seed=5)


def _prompts():
    """Two rows of different lengths and layouts (text, video, text)."""
    rng = np.random.default_rng(4)
    return [_tiny.prompt([_tiny.random_text(rng, 5), _tiny.visual(rng, (2, 4, 6)), _tiny.random_text(rng, 4)]),
            _tiny.prompt([_tiny.random_text(rng, 9), _tiny.visual(rng, (2, 4, 4)), _tiny.random_text(rng, 2)])]


@partial(jax.jit, static_argnames=("graphdef", "from_layer"))
def _forward(graphdef, params, batch, from_layer=None):
    """Jitted `tg.forward`'s final-norm hidden with visual KV removed from `from_layer` on (None: none)."""
    model = nnx.merge(graphdef, params)
    vis = None if from_layer is None else tg.visual_key_visibility(batch, from_layer, model.cfg.num_layers)
    return tg.forward(model, batch, key_visible_LBS=vis)[0]


@partial(jax.jit, static_argnames="graphdef")
def _text_alone(graphdef, params, batch):
    """Final-norm hidden of a forward over each row's text positions only (ids and M-RoPE positions
    gathered, causal among themselves): [B, L, D]."""
    model = nnx.merge(graphdef, params)
    idx_BL = batch.text_idx_BL
    ids_BL = jnp.take_along_axis(batch.input_ids_BT, idx_BL, axis=1)
    pos_3BL = jnp.take_along_axis(batch.positions_3BT, jnp.broadcast_to(idx_BL[None], (3,) + idx_BL.shape), axis=2)
    cos, sin = model.rope(pos_3BL)
    mask = attn_lib.MaskSpec(kv_len_B=batch.text_len_B, causal=True)
    return model.model(model.embed(ids_BL), cos, sin, mask)[0]


def _generate(model, batch, from_layer):
    """prefill + greedy ar_generate with visual KV removed from `from_layer` on (None: the production path)."""
    graphdef, params = nnx.split(model)
    L, T = model.cfg.num_layers, batch.input_ids_BT.shape[1]
    cap = cache_capacity(T, NEW)
    vis = (lambda size: None) if from_layer is None else (
        lambda size: tg.visual_key_visibility(batch, from_layer, L, size))
    pre = tg.prefill(graphdef, params, batch, capacity=cap, m_star=1, key_visible_LBS=vis(T))
    res = ar_generate(graphdef, params, pre.cache, pre.last_logits_BV, pre.rope_delta_B, jax.random.key(0),
                      max_new_tokens=NEW, sampling=SamplingParams(), key_visible_LBS=vis(cap))
    return pre.last_logits_BV, np.asarray(res.tokens_BM)


def test_no_removal_is_the_normal_forward_and_generation(model):
    batch = prepare_prefill_batch(_prompts(), model.cfg)
    logits, toks = _generate(model, batch, None)
    logits_L, toks_L = _generate(model, batch, model.cfg.num_layers)
    np.testing.assert_array_equal(np.asarray(logits_L), np.asarray(logits))
    np.testing.assert_array_equal(toks_L, toks)
    logits_0, _ = _generate(model, batch, 0)
    assert np.abs(np.asarray(logits_0) - np.asarray(logits)).max() > 1e-3, "removing the visual KV changes nothing"


def test_removal_everywhere_is_the_text_alone(model):
    """x = 0: every text position's final hidden state equals a forward over the text positions only
    (same token ids, same M-RoPE positions, causal among themselves)."""
    batch = prepare_prefill_batch(_prompts(), model.cfg)
    graphdef, params = nnx.split(model)
    h_BTD = _forward(graphdef, params, batch, from_layer=0)
    ref_BLD = _text_alone(graphdef, params, batch)
    h_normal = _forward(graphdef, params, batch)
    idx_BL = batch.text_idx_BL
    for b in range(2):
        n = int(batch.text_len_B[b])
        got = np.asarray(h_BTD[b, np.asarray(idx_BL[b, :n])])
        np.testing.assert_allclose(got, np.asarray(ref_BLD[b, :n]), atol=1e-5, rtol=0)
        after_video = np.asarray(h_normal[b, np.asarray(idx_BL[b, n - 1])])
        assert np.abs(got[-1] - after_video).max() > 1e-3  # the normal forward reads the video


def test_cached_decoding_under_the_mask_equals_the_masked_full_forward(model, from_layer=1):
    """Greedy tokens of prefill + ar_generate with the mask at every step == argmax of one masked forward
    over prompt + those tokens (teacher forcing), at each generated position."""
    prompts = _prompts()
    batch = prepare_prefill_batch(prompts, model.cfg)
    _, toks = _generate(model, batch, from_layer)
    for b, p in enumerate(prompts):
        n = len(p.input_ids)
        full = prepare_prefill_batch([types.SimpleNamespace(
            input_ids=np.concatenate([p.input_ids, toks[b]]).astype(np.int32),
            mm_token_type_ids=np.concatenate([p.mm_token_type_ids, np.zeros(NEW, np.int32)]),
            visuals=p.visuals)], model.cfg)
        h = _forward(*nnx.split(model), full, from_layer=from_layer)
        pred = np.asarray(jnp.argmax(model.logits(h[0, n - 1:n + NEW - 1]), -1))
        np.testing.assert_array_equal(pred, toks[b])


def test_study_mask_refuses_other_paths():
    q = jnp.zeros((1, 4, 2, 8))
    mask = attn_lib.MaskSpec(kv_len_B=jnp.asarray([4]), causal=True, key_visible_BS=jnp.ones((1, 4), bool))
    with pytest.raises(ValueError, match="key_visible_BS"):
        attn_lib.attention(q, q[:, :, :1], q[:, :, :1], mask, impl=attn_lib.AttentionImpl("pallas"))
    with pytest.raises(ValueError, match="key_visible_BS"):
        attn_lib.blockwise_attention(q, q[:, :, :1], q[:, :, :1], mask)


def test_internalization_layer_and_verdict():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import internalization as bench

    assert bench.internalization_layer([0.1, 0.5, 0.97, 0.9, 1.0, 1.0, 1.0], 0.05) == 4  # a dip at 3 counts
    assert bench.internalization_layer([0.1, 0.96, 1.0], 0.05) == 1
    assert bench.internalization_layer([1.0, 1.0], 0.0) == 0
    assert bench.verdict(5, 6, 4, 0.0, 0.05)[0] == [1, 4]
    rng, text = bench.verdict(4, 6, 4, 0.0, 0.05)
    assert rng == [1, 3] and "NOT supported" in text
    assert bench.verdict(0, 6, 4, 1.0, 0.05)[0] is None and bench.verdict(1, 6, 4, 0.2, 0.05)[0] is None


@pytest.mark.slow
def test_benchmark_runs_on_a_random_target(tmp_path, capsys):
    """bench/internalization.py end to end on a random exported target of the shipped architecture:
    x = L (nothing removed) reproduces the unmodified target; one JSON line, a table and a plot."""
    import json
    import sys
    from pathlib import Path

    from sparrow_jax.models import registry
    from sparrow_jax.synthetic.tokenizer import SHIPPED_DIR
    from sparrow_jax.training.target_trainer import export_hf

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "bench"))
    import internalization as bench

    cfg = registry.config_from_dict(*registry.read_config_dict(root / "configs" / "tiny.json"))
    export_hf(registry.build_target(cfg, rngs=nnx.Rngs(0)), tmp_path / "t", tokenizer_dir=SHIPPED_DIR)
    rec = bench.main(["--target", str(tmp_path / "t"), "--scenes", "2", "--max-new-tokens", "3", "--no-progress",
                      "--jsonl", str(tmp_path / "r.jsonl"), "--plot", str(tmp_path / "p.png")])
    L = cfg.num_layers
    assert [r["x"] for r in rec["rows"]] == list(range(L + 1)) and len(rec["layers"]) == L
    assert rec["rows"][-1]["next_token_same"] == 1.0 and rec["rows"][-1]["answer_identical"] == 1.0
    assert rec["rows"][-1]["kl_nats"] == 0.0 and 0 <= rec["x_star"] <= L
    assert all(-1 <= li["cos_visual"] <= 1 and 0 <= li["attn_visual"] <= 1 for li in rec["layers"])
    line = json.loads((tmp_path / "r.jsonl").read_text())
    assert line["x_star"] == rec["x_star"] and "command" in line and "jax" in line
    assert "x* = " in capsys.readouterr().out
    pytest.importorskip("matplotlib")
    assert (tmp_path / "p.png").stat().st_size > 0

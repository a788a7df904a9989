"""Bounded prefill memory: the vision tower run in chunks of whole frame groups (Qwen2.5-VL) or tiles
(LLaVA-OneVision) gives the same visual tokens, prefill logits, cache and decoded tokens as one call over
every patch; the chunk plan covers every row once, pads only the last chunk, and compiles once per chunk
shape whatever the video length; the batch keeps one video's host pixels without copying them."""

import jax
import numpy as np
import pytest
from flax import nnx

import _tiny
from sparrow_jax.decoding.autoregressive import ar_generate, cache_capacity
from sparrow_jax.io import llava_inputs as li
from sparrow_jax.models import llava_onevision as lo
from sparrow_jax.models import registry
from sparrow_jax.models import target as tg
from sparrow_jax.models.qwen2_5_vl import prepare_prefill_batch, vision_chunks

TOL = 1e-5  # fp32
HW = 4 * 6  # patches per frame group of the (t, 4, 6) grids below


@pytest.fixture(scope="module")
def qwen():
    model = _tiny.random_model(seed=5)
    return model, nnx.split(model)


def _qwen_prompt(seed, grids, kinds=None):
    rng = np.random.default_rng(seed)
    segs = [_tiny.random_text(rng, 4)]
    for i, grid in enumerate(grids):
        segs += [_tiny.visual(rng, grid, (kinds or ["video"] * len(grids))[i]), _tiny.random_text(rng, 3)]
    return _tiny.prompt(segs)


def _maxerr(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


# ------------------------------------------------------------------------------------------- the plan


@pytest.mark.parametrize("budget", [1, HW, 2 * HW, 3 * HW, 10 * HW, 10**6])
def test_plan_covers_every_row_once_and_pads_only_last_chunks(budget):
    group_hw = [(4, 6)] * 7 + [(2, 2)] + [(4, 6)] * 3  # a video, an image, another video of the first's size
    plan = vision_chunks(np.asarray(group_hw), _tiny.our_config().vision, budget)
    rows = [r for r in plan]
    assert rows[0][0] == 0
    for (row, n, G, h, w, valid), nxt in zip(rows, rows[1:] + [None]):
        assert n == valid * h * w and 1 <= valid <= G
        assert G * h * w <= max(budget, h * w)  # a chunk never exceeds the budget unless one group does
        if nxt is not None:
            assert nxt[0] == row + n  # contiguous, in order
    assert sum(r[1] for r in rows) == sum(h * w for h, w in group_hw)
    assert sum(r[5] for r in rows) == len(group_hw)


def test_plan_shapes():
    v = _tiny.our_config().vision
    # 7 groups, 3 per chunk: 3 + 3 + 1 (padded to 3)
    assert [(G, valid) for _, _, G, _, _, valid in vision_chunks([(4, 6)] * 7, v, 3 * HW)] == [(3, 3), (3, 3), (3, 1)]
    # a run shorter than the budget: one chunk, G rounded up to one of 4 sizes per doubling past 8 groups
    # (never past the budget): exact up to 8, then multiples of 2, 4, ... -- padding under a quarter
    assert [(G, valid) for _, _, G, _, _, valid in vision_chunks([(4, 6)] * 5, v, 100 * HW)] == [(5, 5)]
    for n, want in [(9, 10), (12, 12), (17, 20), (96, 96), (97, 112), (129, 160)]:
        assert [(G, valid) for _, _, G, _, _, valid in vision_chunks([(4, 6)] * n, v, 1000 * HW)] == [(want, n)]
    assert [(G, valid) for _, _, G, _, _, valid in vision_chunks([(4, 6)] * 11, v, 11 * HW)] == [(11, 11)]
    assert [(G, valid) for _, _, G, _, _, valid in vision_chunks([(4, 6)] * 11, v, 11 * HW + 1)] == [(11, 11)]
    assert [(G, valid) for _, _, G, _, _, valid in vision_chunks([(4, 6)] * 9, v, 9 * HW)] == [(9, 9)]
    # an image is one group: one chunk of G = 1, whatever the budget
    assert [(G, valid) for _, _, G, _, _, valid in vision_chunks([(4, 6)], v, 1)] == [(1, 1)]


# ---------------------------------------------------------------------------------- Qwen2.5-VL parity


QWEN_CASES = {  # name -> (grids, kinds, chunk budget in patches)
    "not-dividing": ([(7, 4, 6)], None, 3 * HW),  # 3 + 3 + 1 (padded)
    "one-chunk": ([(7, 4, 6)], None, 10**6),
    "one-group-per-chunk": ([(5, 4, 6)], None, 1),
    "image": ([(1, 4, 6)], ["image"], 3 * HW),
    "image-video-mixed-sizes": ([(1, 6, 4), (5, 4, 6), (1, 4, 6)], ["image", "video", "image"], 2 * HW),
}


@pytest.mark.parametrize("case", sorted(QWEN_CASES))
def test_qwen_chunked_features_equal_one_call(qwen, case):
    model, (graphdef, params) = qwen
    grids, kinds, budget = QWEN_CASES[case]
    batch = prepare_prefill_batch([_qwen_prompt(1, grids, kinds)], model.cfg)
    want = model.encode_visuals(batch.pixels_PC, batch.vision_layout)
    got = tg.encode_visuals_chunked(graphdef, params, batch.pixels_PC, batch.vision_layout, chunk_patches=budget)
    assert _maxerr(got, want) <= TOL


def test_qwen_prefill_and_decode_equal_unchunked_two_rows(qwen):
    """Two rows with videos of different lengths: logits, cache and the greedy tokens are those of the
    reference path (the tower over every patch inside the one prefill call)."""
    model, (graphdef, params) = qwen
    prompts = [_qwen_prompt(2, [(5, 4, 6)]), _qwen_prompt(3, [(3, 4, 6), (1, 4, 6)], ["video", "image"])]
    batch = prepare_prefill_batch(prompts, model.cfg)
    cap = cache_capacity(batch.input_ids_BT.shape[1], 8)
    ref = tg.prefill(graphdef, params, batch, capacity=cap, m_star=2, states=True, vision_chunk_patches=None)
    got = tg.prefill(graphdef, params, batch, capacity=cap, m_star=2, states=True, vision_chunk_patches=2 * HW)
    assert _maxerr(got.last_logits_BV, ref.last_logits_BV) <= TOL
    assert _maxerr(got.vis_hidden_mid_BMD, ref.vis_hidden_mid_BMD) <= TOL
    for k_ref, k_got in zip(ref.cache.k, got.cache.k):
        assert _maxerr(k_got, k_ref) <= TOL
    toks = [ar_generate(graphdef, params, p.cache, p.last_logits_BV, p.rope_delta_B, jax.random.key(0),
                        max_new_tokens=8) for p in (ref, got)]
    assert np.array_equal(np.asarray(toks[0].tokens_BM), np.asarray(toks[1].tokens_BM))


def test_one_compile_per_chunk_shape_whatever_the_length(qwen):
    """Videos of 7, 13 and 22 frame groups of one size reuse one compiled chunk (3 groups each); the
    chunk function never sees the video's length."""
    model, (graphdef, params) = qwen
    sizes = []
    for t in (7, 13, 22):
        batch = prepare_prefill_batch([_qwen_prompt(t, [(t, 4, 6)])], model.cfg)
        tg.encode_visuals_chunked(graphdef, params, batch.pixels_PC, batch.vision_layout, chunk_patches=3 * HW)
        sizes.append(tg._encode_chunk._cache_size())
    assert sizes[1] == sizes[0] and sizes[2] == sizes[0]


def test_batch_keeps_one_videos_pixels_without_a_copy(qwen):
    model, _ = qwen
    p = _qwen_prompt(4, [(3, 4, 6)])
    batch = prepare_prefill_batch([p], model.cfg)
    assert isinstance(batch.pixels_PC, np.ndarray) and np.shares_memory(batch.pixels_PC, p.visuals[0].pixel_values)


# ----------------------------------------------------------------------------------- LLaVA-OneVision


LLAVA_CONFIG = dict(  # tests/test_llava_onevision.py's "odd" config: tile 22 px / patch 4 -> G = 5
    model_type="llava_onevision", image_token_index=290, video_token_index=291,
    vision_feature_select_strategy="full", vision_feature_layer=-1, vision_aspect_ratio="anyres_max_1",
    image_grid_pinpoints=[[22, 22], [22, 44], [44, 22], [44, 44], [22, 66], [66, 22]],
    text_config=dict(model_type="qwen2", vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0),
    vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, image_size=22, patch_size=4, vision_use_head=False))


@pytest.fixture(scope="module")
def llava():
    cfg = registry.config_from_dict(LLAVA_CONFIG)
    model = registry.build_target(cfg, rngs=nnx.Rngs(3))
    return model, nnx.split(model)


def _llava_prompt(cfg, frames, image_hw=None, seed=0):
    rng = np.random.default_rng(seed)
    S = cfg.vision.image_size
    parts = [rng.integers(1, 280, 4).tolist(),
             li.LlavaVisual("video", rng.standard_normal((frames, 3, S, S)).astype(np.float32)),
             rng.integers(1, 280, 3).tolist()]
    if image_hw is not None:  # a second visual: an anyres image (base tile + its grid of tiles)
        n = lo.num_tiles("image", cfg, image_hw=image_hw, anyres=True)
        parts += [li.LlavaVisual("image", rng.standard_normal((n, 3, S, S)).astype(np.float32), image_hw, True),
                  rng.integers(1, 280, 2).tolist()]
    return li.build_prompt(parts, cfg)


@pytest.mark.parametrize("frames,image_hw,budget_tiles", [(7, None, 3), (5, (30, 50), 2), (3, None, 100), (9, None, 1)])
def test_llava_chunked_features_and_prefill_equal_one_call(llava, frames, image_hw, budget_tiles):
    model, (graphdef, params) = llava
    batch = lo.prepare_prefill_batch([_llava_prompt(model.cfg, frames, image_hw)], model.cfg)
    budget = budget_tiles * model.cfg.vision.grid ** 2
    want = model.encode_visuals(batch.pixels_PC, batch.vision_layout)
    got = tg.encode_visuals_chunked(graphdef, params, batch.pixels_PC, batch.vision_layout, chunk_patches=budget)
    assert _maxerr(got, want) <= TOL
    cap = cache_capacity(batch.input_ids_BT.shape[1], 4)
    ref = tg.prefill(graphdef, params, batch, capacity=cap, m_star=2, vision_chunk_patches=None)
    out = tg.prefill(graphdef, params, batch, capacity=cap, m_star=2, vision_chunk_patches=budget)
    assert _maxerr(out.last_logits_BV, ref.last_logits_BV) <= TOL
    assert _maxerr(out.cache.k[-1], ref.cache.k[-1]) <= TOL


def test_lower_prefill_lowers_the_programs_prefill_runs(llava):
    """`target.lower_prefill` (where tests read the prefill's attention routes) lowers one tower program
    per chunk of prefill's plan, then the LM program on visual features of the shape and dtype prefill's
    chunked encoding gives (the tiles' bilinear combination included)."""
    model, (graphdef, params) = llava
    batch = lo.prepare_prefill_batch([_llava_prompt(model.cfg, 7, (30, 50))], model.cfg)
    budget = 3 * model.cfg.vision.grid ** 2
    cap = cache_capacity(batch.input_ids_BT.shape[1], 4)
    *chunks, lm = tg.lower_prefill(graphdef, params, batch, capacity=cap, m_star=2, vision_chunk_patches=budget)
    assert len(chunks) == len(list(model.visual_chunks(batch.pixels_PC, batch.vision_layout, budget))) > 1
    feats = tg.encode_visuals_chunked(graphdef, params, batch.pixels_PC, batch.vision_layout, chunk_patches=budget)
    lowered_batch = lm.args_info[0][-1]
    assert lowered_batch.pixels_PC is None and lowered_batch.vision_layout is None
    assert (lowered_batch.visual_feats_MD.shape, lowered_batch.visual_feats_MD.dtype) == (feats.shape, feats.dtype)
    [whole] = tg.lower_prefill(graphdef, params, batch, capacity=cap, m_star=2, vision_chunk_patches=None)
    assert whole.args_info[0][-1].pixels_PC.shape == batch.pixels_PC.shape  # the reference path: one program

"""Numerical parity of our Qwen2.5-VL port with transformers' reference implementation.

Tiny random checkpoints are built and saved by transformers (`_tiny.save_hf_checkpoint`) and loaded
with `load_qwen2_5_vl`. Every case is run through both implementations in fp32 and compared on:
vision tower output, 3-D M-RoPE positions and rope delta, every layer's hidden state, logits at all
prompt positions, and greedy generation. The configs together cover windowed and full-attention
vision blocks (including windows that do not divide the merged grid), GQA ratios 1, 2 and 3,
several mrope_section splits, tokens_per_second 2 and 4, odd frame counts (t = 1, 3, 5), images,
videos and prompts mixing both.

Decoding is checked three ways: greedy `generate` against transformers' `generate` (single prompts
and one right-padded batch), and teacher-forced `prefill` + `verify` over HF's greedy tokens against
HF's per-step logits — including prompts whose video temporal positions run past the last text
position, where the decode rule matters (generated text continues from the last prompt position, as
in transformers 5.23 `generate`, not from get_rope_index's max-based delta).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses
import zlib
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import _tiny  # noqa: E402
from sparrow_jax.decoding.autoregressive import cache_capacity, generate  # noqa: E402
from sparrow_jax.io.hf_checkpoint import load_qwen2_5_vl  # noqa: E402
from sparrow_jax.models import target as tg  # noqa: E402
from sparrow_jax.models.attention import XLA  # noqa: E402
from sparrow_jax.models.qwen2_5_vl import prepare_prefill_batch  # noqa: E402

TOL = 1e-4
NEAR_TIE = 1e-5  # a greedy mismatch is accepted only where HF's top-2 logit margin is below this
MAX_NEW = 12


def _rope(mrope_section, theta=10000.0):
    return {"rope_type": "default", "rope_theta": theta, "mrope_section": list(mrope_section)}


# name -> HF config dict. Window sizes are in pixels: window // merge // patch merged units per side.
CONFIGS = {
    # 4 q heads / 2 kv heads (GQA 2), head_dim 16, mrope [2,3,3]; vision window 2x2 merged units,
    # block 1 full attention, blocks 0 and 2 windowed; tokens_per_second 2.
    "gqa2": _tiny.hf_config_dict(text={"initializer_range": 0.08}),
    # 6 q heads / 2 kv heads (GQA 3), head_dim 16, mrope [4,2,2], rope_theta 1e6; vision window 3x3
    # merged units (never divides the grids used below), blocks 0 and 2 full attention;
    # tokens_per_second 4.
    "gqa3": _tiny.hf_config_dict(
        text={"hidden_size": 96, "intermediate_size": 160, "num_attention_heads": 6, "num_key_value_heads": 2,
              "initializer_range": 0.08, "rope_parameters": _rope([4, 2, 2], 1e6)},
        vision={"window_size": 84, "fullatt_block_indexes": [0, 2], "tokens_per_second": 4, "out_hidden_size": 96}),
    # 4 q heads / 4 kv heads (MHA), head_dim 16, mrope [1,1,6]; vision: 4 heads of 16, window 4x4 merged
    # units, only block 2 full attention, two layers; tokens_per_second 4.
    "mha": _tiny.hf_config_dict(
        text={"num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 2, "initializer_range": 0.08,
              "rope_parameters": _rope([1, 1, 6])},
        vision={"hidden_size": 64, "num_heads": 4, "intermediate_size": 96, "window_size": 112,
                "fullatt_block_indexes": [2], "tokens_per_second": 4}),
}


def V(grid, sec=1.0):
    return ("video", tuple(grid), sec)


def I(grid):  # noqa: E743
    return ("image", tuple(grid), 1.0)


# name -> (config, segments). Text segments are lengths of random text; tuples are visuals.
CASES = {
    # t=3 video, merged grid 4x6: window 2 divides it (transformers still pads a full extra window row).
    "gqa2-video-t3": ("gqa2", [5, V((3, 8, 12), 1.0), 4]),
    # image with merged grid 3x5: windows of 2 do not divide it.
    "gqa2-image": ("gqa2", [3, I((1, 6, 10)), 6]),
    # image then video in one prompt; sec 0.5 * tps 2 -> temporal stride 1.
    "gqa2-image-video": ("gqa2", [2, I((1, 4, 6)), 3, V((5, 4, 4), 0.5), 3]),
    # t=5 video, merged grid 4x5 with windows of 3; sec 0.5 * tps 4 -> temporal stride 2.
    "gqa3-video-t5": ("gqa3", [4, V((5, 8, 10), 0.5), 5]),
    # t=1 video (sec 2.0 * tps 4 = stride 8, single frame) followed by an image.
    "gqa3-video-t1-image": ("gqa3", [3, V((1, 6, 6), 2.0), 2, I((1, 8, 6)), 4]),
    # t=3 video with stride 8 (sec 2.0), merged grid 6x4, windows of 4.
    "mha-video-t3": ("mha", [6, V((3, 12, 8), 2.0), 3]),
    # starts with an image; video sec 1.0 * tps 4 = stride 4.
    "mha-image-video": ("mha", [I((1, 10, 6)), 2, V((3, 6, 10), 1.0), 5]),
    # two videos with different seconds per grid (0.3 * 4 = 1.2: floor(i * 1.2) is uneven).
    "mha-two-videos": ("mha", [2, V((3, 4, 4), 0.3), 3, V((5, 4, 6), 2.0), 2]),
    # t=5 video with stride 8: temporal positions reach start + 32, far past the 2x2 merged grid and
    # the short text after it.
    "gqa3-long-video": ("gqa3", [3, V((5, 4, 4), 2.0), 2]),
}

# Decode-position rules. The library decodes at cache slot + rope_delta with rope_delta = last prompt
# position + 1 - T, as transformers 5.23 `generate` continues (`_update_model_kwargs_for_generation`).
# `get_rope_index` returns a max-based delta instead; since 5.x resumes text after a visual block at
# start + max(h, w) / merge, ignoring the temporal extent, the two agree only when the prompt's last
# token holds its maximum position (ENDS_AT_MAX) and differ in TIME_OUTRUNS_TEXT.
ENDS_AT_MAX = ["gqa2-video-t3", "gqa2-image", "gqa2-image-video", "gqa3-video-t5", "gqa3-video-t1-image",
               "mha-image-video"]
TIME_OUTRUNS_TEXT = ["gqa3-long-video", "mha-two-videos", "mha-video-t3"]
GENERATE_CASES = ["gqa2-video-t3", "gqa2-image", "gqa2-image-video", "gqa3-video-t5", "mha-image-video"]
DECODE_CASES = ["gqa2-image-video", "gqa3-video-t5", "mha-image-video"]


@dataclasses.dataclass
class Loaded:
    hf: object
    ours: object
    path: object


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Lazily built checkpoints: name -> Loaded (HF model + our model loaded from its save)."""
    cache = {}

    def get(name):
        if name not in cache:
            path = tmp_path_factory.mktemp(f"ckpt-{name}")
            hf = _tiny.save_hf_checkpoint(path, CONFIGS[name], seed=case_seed(name) % 2**31)
            cache[name] = Loaded(hf, load_qwen2_5_vl(path), path)
        return cache[name]

    return get


def case_seed(name, salt=0):
    """A seed stable across runs and test selections (not dependent on build order)."""
    return zlib.crc32(name.encode()) + salt


def build_prompt(segments, seed):
    rng = np.random.default_rng(seed)
    parts = []
    for s in segments:
        if isinstance(s, int):
            parts.append(_tiny.random_text(rng, s))
        else:
            kind, grid, sec = s
            parts.append(_tiny.visual(rng, grid, kind=kind, second_per_grid_t=sec))
    return _tiny.prompt(parts)


def hf_inputs(p):
    """transformers kwargs for one prompt (batch 1), images and videos split by kind."""
    kw = {"input_ids": torch.tensor(p.input_ids[None], dtype=torch.long),
          "mm_token_type_ids": torch.tensor(p.mm_token_type_ids[None], dtype=torch.long),
          "attention_mask": torch.ones(1, len(p.input_ids), dtype=torch.long)}
    imgs = [v for v in p.visuals if v.kind == "image"]
    vids = [v for v in p.visuals if v.kind == "video"]
    if imgs:
        kw["pixel_values"] = torch.tensor(np.concatenate([v.pixel_values for v in imgs]))
        kw["image_grid_thw"] = torch.tensor([v.grid_thw for v in imgs], dtype=torch.long)
    if vids:
        kw["pixel_values_videos"] = torch.tensor(np.concatenate([v.pixel_values for v in vids]))
        kw["video_grid_thw"] = torch.tensor([v.grid_thw for v in vids], dtype=torch.long)
        kw["second_per_grid_ts"] = torch.tensor([v.second_per_grid_t for v in vids], dtype=torch.float32)
    return kw


@partial(jax.jit, static_argnames=("graphdef",))
def _ours_forward(graphdef, params, batch):
    model = nnx.merge(graphdef, params)
    vis = model.encode_visuals(batch.pixels_PC, batch.vision_layout)
    h, _, captured = tg.forward(model, batch, capture=tuple(range(model.cfg.num_layers)))
    return vis, h, model.logits(h), captured


def ours_forward(model, batch):
    """Jitted (one compile per case instead of hundreds of eager op compiles): the vision tower
    output, final-norm hidden [B, T, D], logits [B, T, V] and hidden states 0..L-1."""
    graphdef, params = nnx.split(model)
    return _ours_forward(graphdef, params, batch)


@dataclasses.dataclass
class CaseResult:
    T: int
    ours_vision: np.ndarray
    hf_vision: np.ndarray
    ours_pos: np.ndarray  # [3, T]
    hf_pos: np.ndarray
    ours_delta: int
    hf_delta: int
    ours_logits: np.ndarray  # [T, V]
    hf_logits: np.ndarray
    ours_hidden: list  # L + 1 entries [T, D]; the last one after the final norm
    hf_hidden: list


def run_case(zoo, case) -> CaseResult:
    cfg_name, segments = CASES[case]
    m = zoo(cfg_name)
    p = build_prompt(segments, seed=case_seed(case))
    T = len(p.input_ids)
    L = m.ours.cfg.num_layers

    batch = prepare_prefill_batch([p], m.ours.cfg)
    vis, h, logits, captured = ours_forward(m.ours, batch)
    logits = np.asarray(logits)[0, :T]
    ours_hidden = [np.asarray(captured[i])[0, :T] for i in range(L)] + [np.asarray(h)[0, :T]]

    kw = hf_inputs(p)
    all_pix = torch.tensor(np.concatenate([v.pixel_values for v in p.visuals]))
    all_grids = torch.tensor([v.grid_thw for v in p.visuals], dtype=torch.long)
    with torch.no_grad():
        hf_vis = m.hf.model.visual(all_pix, grid_thw=all_grids).pooler_output.numpy()
        pos, delta = m.hf.model.get_rope_index(
            kw["input_ids"], kw["mm_token_type_ids"], image_grid_thw=kw.get("image_grid_thw"),
            video_grid_thw=kw.get("video_grid_thw"), second_per_grid_ts=kw.get("second_per_grid_ts"))
        out = m.hf(**kw, output_hidden_states=True)
    return CaseResult(
        T=T, ours_vision=vis, hf_vision=hf_vis,
        ours_pos=np.asarray(batch.positions_3BT)[:, 0, :T], hf_pos=pos.numpy()[:, 0],
        ours_delta=int(batch.rope_delta_B[0]), hf_delta=int(delta.reshape(-1)[0]),
        ours_logits=logits, hf_logits=out.logits[0].numpy(),
        ours_hidden=ours_hidden, hf_hidden=[x[0].numpy() for x in out.hidden_states])


@pytest.fixture(scope="module")
def results(zoo):
    cache = {}

    def get(case):
        if case not in cache:
            cache[case] = run_case(zoo, case)
        return cache[case]

    return get


def maxerr(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


# ------------------------------------------------------------------------------------------ configs


def test_configs_cover_the_brief():
    """The parity matrix really spans what it claims (guards against config edits shrinking it)."""
    cfgs = {n: _tiny.our_config(d) for n, d in CONFIGS.items()}
    assert {c.text.num_attention_heads // c.text.num_key_value_heads for c in cfgs.values()} == {1, 2, 3}
    assert {c.text.mrope_section for c in cfgs.values()} == {(2, 3, 3), (4, 2, 2), (1, 1, 6)}
    assert {c.vision.tokens_per_second for c in cfgs.values()} == {2, 4}
    for c in cfgs.values():
        assert 0 < len(c.vision.fullatt_block_indexes) < c.vision.depth  # both block kinds
    frames, secs, kinds, non_dividing = set(), set(), set(), False
    for cfg_name, segs in CASES.values():
        vc = cfgs[cfg_name].vision
        win = vc.window_size // vc.spatial_merge_size // vc.patch_size
        for s in segs:
            if isinstance(s, tuple):
                kind, (t, h, w), sec = s
                kinds.add(kind)
                frames.add(t)
                if kind == "video":
                    secs.add(sec)
                lh, lw = h // vc.spatial_merge_size, w // vc.spatial_merge_size
                non_dividing |= bool(lh % win or lw % win)
    assert {1, 3, 5} <= frames and {0.5, 1.0, 2.0} <= secs and kinds == {"image", "video"} and non_dividing
    assert any({"image", "video"} <= {s[0] for s in segs if isinstance(s, tuple)} for _, segs in CASES.values())


# --------------------------------------------------------------------------------- forward parity


@pytest.mark.parametrize("case", sorted(CASES))
def test_rope_index_matches_hf(results, case):
    r = results(case)
    np.testing.assert_array_equal(r.ours_pos, r.hf_pos)
    assert r.ours_delta == int(r.hf_pos[:, -1].max()) + 1 - r.T  # HF generate's decode rule
    if case in ENDS_AT_MAX:
        assert r.ours_delta == r.hf_delta


@pytest.mark.parametrize("case", sorted(CASES))
def test_vision_tower_matches_hf(results, case):
    r = results(case)
    assert maxerr(r.ours_vision, r.hf_vision) <= TOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_hidden_states_match_hf(results, case):
    r = results(case)
    assert len(r.ours_hidden) == len(r.hf_hidden)
    errs = [maxerr(a, b) for a, b in zip(r.ours_hidden, r.hf_hidden)]
    assert max(errs) <= TOL, errs


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_hf(results, case):
    r = results(case)
    assert r.ours_logits.shape == (r.T, _tiny.VOCAB)
    assert maxerr(r.ours_logits, r.hf_logits) <= TOL


# ---------------------------------------------------------------------------------- greedy generate


def hf_greedy(hf, p, n):
    """transformers' greedy continuation of one prompt and the raw logits of every step."""
    with torch.no_grad():
        out = hf.generate(**hf_inputs(p), max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    toks = out.sequences[0, len(p.input_ids):].tolist()
    return toks, np.stack([x[0].float().numpy() for x in out.logits])


def assert_greedy_equal(ours, ref, ref_logits):
    """Token-exact, except that a divergence is accepted where the reference's top-2 margin is a
    genuine near-tie (< NEAR_TIE) and our token is one of the tied pair; later tokens then differ."""
    assert len(ours) == len(ref) == MAX_NEW, (ours, ref)
    for k, (a, b) in enumerate(zip(ours, ref)):
        if a == b:
            continue
        top2 = np.sort(ref_logits[k])[-2:]
        margin = float(top2[1] - top2[0])
        assert margin < NEAR_TIE and ref_logits[k][a] >= top2[0], (
            f"step {k}: ours {a} vs HF {b} (HF top-2 margin {margin:.3g}); ours {ours}, HF {ref}")
        return


def generate_prompt(case):
    return build_prompt(CASES[case][1], seed=case_seed(case, salt=1))


@pytest.fixture(scope="module")
def hf_refs(zoo):
    """case -> (HF greedy tokens, HF per-step logits [MAX_NEW, V]) for `generate_prompt(case)`."""
    cache = {}

    def get(case):
        if case not in cache:
            cache[case] = hf_greedy(zoo(CASES[case][0]).hf, generate_prompt(case), MAX_NEW)
        return cache[case]

    return get


def test_decode_cases_are_classified_right(results):
    for case in ENDS_AT_MAX + TIME_OUTRUNS_TEXT:
        r = results(case)
        ends_at_max = r.hf_pos[:, -1].max() == r.hf_pos.max()
        assert ends_at_max == (case in ENDS_AT_MAX), case
    assert set(DECODE_CASES) <= set(GENERATE_CASES) <= set(ENDS_AT_MAX)


def test_generate_cases_cover_every_config():
    assert len(GENERATE_CASES) >= 5 and {CASES[c][0] for c in GENERATE_CASES} == set(CONFIGS)
    assert {s[0] for c in GENERATE_CASES for s in CASES[c][1] if isinstance(s, tuple)} == {"image", "video"}


@pytest.mark.parametrize("case", GENERATE_CASES)
def test_greedy_generate_matches_hf(zoo, hf_refs, case):
    m = zoo(CASES[case][0])
    ours = generate(m.ours, [generate_prompt(case)], max_new_tokens=MAX_NEW, eos_ids=())[0]
    assert_greedy_equal(ours, *hf_refs(case))


def teacher_forced(zoo, hf_refs, case, positions_fn):
    """Max errors of our prefill's last logits, and of `verify` over the chain of HF's greedy tokens
    at decode positions `positions_fn(batch, pre, n)`, against HF generate's per-step logits."""
    model = zoo(CASES[case][0]).ours
    ref, ref_logits = hf_refs(case)
    batch = prepare_prefill_batch([generate_prompt(case)], model.cfg)
    graphdef, params = nnx.split(model)
    # same static arguments as `generate`'s prefill, so its compiled executable is reused
    pre = tg.prefill(graphdef, params, batch, capacity=cache_capacity(batch.input_ids_BT.shape[1], MAX_NEW),
                     m_star=model.cfg.num_layers // 2, impl=XLA)
    n = MAX_NEW - 1
    chain = jnp.tril(jnp.ones((n, n), bool))
    out = tg.verify(graphdef, params, pre.cache, jnp.asarray([ref[:n]], jnp.int32), positions_fn(batch, pre, n), chain)
    return (maxerr(np.asarray(pre.last_logits_BV)[0], ref_logits[0]),
            maxerr(np.asarray(out.logits_BNV)[0], ref_logits[1:]))


def delta_positions(batch, pre, n):  # the library's decode rule: cache slot + rope delta
    return pre.cache.lengths_B[:, None] + jnp.arange(n)[None] + pre.rope_delta_B[:, None]


def last_plus_one_positions(batch, pre, n):  # transformers 5.23 generate: last prompt position + 1 + i
    last = jnp.max(jnp.take_along_axis(batch.positions_3BT, (batch.lengths_B - 1)[None, :, None], axis=2), axis=0)
    return last + 1 + jnp.arange(n)[None]


@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_logits_match_hf(zoo, hf_refs, case):
    """Teacher-forced on HF's greedy tokens: prefill's last logits and `verify` over the generated
    chain at decode positions cache slot + rope delta reproduce every step's logits."""
    prefill_err, verify_err = teacher_forced(zoo, hf_refs, case, delta_positions)
    assert prefill_err <= TOL and verify_err <= TOL


@pytest.mark.parametrize("case", TIME_OUTRUNS_TEXT[:1])
def test_decode_logits_match_hf_when_video_time_outruns_text(zoo, hf_refs, case):
    """Where video time outruns the text, the library's decode positions equal HF generate's (last
    prompt position + 1 + i) and every step's logits match."""
    prefill_err, verify_err = teacher_forced(zoo, hf_refs, case, delta_positions)
    assert prefill_err <= TOL and verify_err <= TOL
    prefill_err, verify_err = teacher_forced(zoo, hf_refs, case, last_plus_one_positions)
    assert verify_err <= TOL


def test_greedy_generate_matches_hf_when_video_time_outruns_text(zoo, hf_refs):
    case = TIME_OUTRUNS_TEXT[0]
    ours = generate(zoo(CASES[case][0]).ours, [generate_prompt(case)], max_new_tokens=MAX_NEW, eos_ids=())[0]
    assert_greedy_equal(ours, *hf_refs(case))


@pytest.mark.slow
def test_batched_greedy_generate_matches_hf(zoo, hf_refs):
    """Prompts of different lengths and visuals right-padded into one batch decode exactly as HF
    decodes each alone."""
    cases = ["gqa2-video-t3", "gqa2-image", "gqa2-image-video"]
    m = zoo("gqa2")
    ours = generate(m.ours, [generate_prompt(c) for c in cases], max_new_tokens=MAX_NEW, eos_ids=())
    for case, toks in zip(cases, ours):
        assert_greedy_equal(toks, *hf_refs(case))


# ------------------------------------------------------------------------------------- bf16 weights


@pytest.fixture(scope="module")
def bf16_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt-bf16")
    hf = _tiny.save_hf_checkpoint(path, CONFIGS["gqa2"], seed=7, dtype="bfloat16")
    return path, hf


def test_bf16_checkpoint_loads_as_bf16(bf16_ckpt):
    path, hf = bf16_ckpt
    m16 = load_qwen2_5_vl(path, dtype=jnp.bfloat16)
    m32 = load_qwen2_5_vl(path)
    f16 = dict(nnx.to_flat_state(nnx.state(m16, nnx.Param)))
    f32 = dict(nnx.to_flat_state(nnx.state(m32, nnx.Param)))
    assert f16.keys() == f32.keys() and len(f16) > 0
    for k in f16:
        a, b = f16[k][...], f32[k][...]
        assert a.dtype == jnp.bfloat16 and b.dtype == jnp.float32, k
        # bf16 -> fp32 is exact, so both loads hold the same numbers.
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b), err_msg=str(k))
    emb = hf.model.language_model.embed_tokens.weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(f32[("model", "embed_tokens", "embedding")][...]), emb)

    # the bf16 model runs end to end on a video prompt and stays close to its fp32 twin
    p = build_prompt(CASES["gqa2-image-video"][1], seed=3)
    _, h16, l16, _ = ours_forward(m16, prepare_prefill_batch([p], m16.cfg))
    _, _, l32, _ = ours_forward(m32, prepare_prefill_batch([p], m32.cfg))
    T = len(p.input_ids)
    l16 = np.asarray(l16.astype(jnp.float32))[0, :T]
    l32 = np.asarray(l32)[0, :T]
    assert h16.dtype == jnp.bfloat16 and np.isfinite(l16).all()
    assert maxerr(l16, l32) <= 0.1 * np.abs(l32).max()


def test_bf16_checkpoint_fp32_load_matches_hf_upcast(bf16_ckpt):
    """Reference: transformers loading the same bf16 files with dtype=float32. (Not `hf.float()` on
    the bf16 model: `.to(bfloat16)` also rounded its rotary inv_freq buffers, which `.float()` keeps.)"""
    from transformers import Qwen2_5_VLForConditionalGeneration

    path, _ = bf16_ckpt
    hf32 = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    assert all(p.dtype == torch.float32 for p in hf32.parameters())
    m = load_qwen2_5_vl(path, dtype=jnp.float32)
    p = build_prompt(CASES["gqa2-image-video"][1], seed=4)
    T = len(p.input_ids)
    _, _, logits, _ = ours_forward(m, prepare_prefill_batch([p], m.cfg))
    with torch.no_grad():
        ref = hf32(**hf_inputs(p)).logits[0].numpy()
    assert maxerr(np.asarray(logits)[0, :T], ref) <= TOL


# ------------------------------------------------------------------ attention-score pruning signal


def test_last_token_attention_matches_hf_attention_weights(zoo):
    """pruned_visual's 'attention' rule ranks visual positions by the last prompt token's attention at
    layer m*, head-averaged: equal to transformers' eager attention weights of that layer."""
    case = "gqa2-image-video"
    m = zoo(CASES[case][0])
    p = build_prompt(CASES[case][1], seed=case_seed(case))
    T = len(p.input_ids)
    batch = prepare_prefill_batch([p], m.ours.cfg)
    layer = 1
    _, kvs, cap = tg.forward(m.ours, batch, capture=(layer,))
    ours = np.asarray(tg.last_token_attention(m.ours, batch, cap[layer], kvs[layer][0], layer))[0, :T]
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf_eager = Qwen2_5_VLForConditionalGeneration.from_pretrained(m.path, attn_implementation="eager").eval()
    with torch.no_grad():
        out = hf_eager(**hf_inputs(p), output_attentions=True)
    ref = out.attentions[layer][0, :, T - 1, :].mean(0).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)

"""LLaVA-OneVision target: parity with transformers 5.23, checkpoint loading, token counts,
preprocessing, and lossless speculative decoding on it.

Two tiny configs are built and saved by transformers, then loaded with `load_llava_onevision`:
- "odd": SigLIP tile 22 px / patch 4 -> G = 5 (odd, so video pooling 5x5 -> 3x3 is a true
  bilinear resize, as 27 -> 14 on the 7B; and 2 px left over by the 'valid' patch conv, as 384 / 14),
  GQA 2, untied head, anyres_max_1 (tiled images are cropped *and* resized), features from the last
  SigLIP layer;
- "even": tile 16 / patch 4 -> G = 4 (pooling = 2x2 average), MHA, tied embeddings (no lm_head on
  disk), anyres_max_9 (crop only), features = SigLIP layers [-2, -1] concatenated.
Cases cover videos (2-3 frames), anyres images (wide, tall, one tile), multi-image prompts (base
tile + newline each) and image + video prompts. Compared in fp32: visual tokens, every hidden
state, logits (all <= 1e-4), greedy generation (token-exact on >= 5 cases) and teacher-forced
verify logits.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy
import dataclasses
import json
import types
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from sparrow_jax.decoding import engine as E  # noqa: E402
from sparrow_jax.decoding.autoregressive import cache_capacity, generate  # noqa: E402
from sparrow_jax.decoding.tree import TreeSpec  # noqa: E402
from sparrow_jax.io import llava_inputs as li  # noqa: E402
from sparrow_jax.io.hf_checkpoint import CheckpointError, load_llava_onevision, save_llava_onevision  # noqa: E402
from sparrow_jax.models import attention as attn_lib  # noqa: E402
from sparrow_jax.models import llava_onevision as lo  # noqa: E402
from sparrow_jax.models import registry  # noqa: E402
from sparrow_jax.models import target as tg  # noqa: E402
from sparrow_jax.models.draft import DraftConfig, SparrowDraft  # noqa: E402
from sparrow_jax.models.qwen2_5_vl import ConfigError  # noqa: E402
from sparrow_jax.training.data import Sample, SlotSpec, collate  # noqa: E402
from sparrow_jax.training.features import FeatureSpec, fill_features, online_batch, records_for  # noqa: E402
from sparrow_jax.training.losses import LossConfig, draft_loss  # noqa: E402

TOL = 1e-4
NEAR_TIE = 1e-5
MAX_NEW = 12
IMAGE, VIDEO = 290, 291


def hf_config(name):
    text = dict(model_type="qwen2", vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0,
                initializer_range=0.08)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=22, patch_size=4, vision_use_head=False)
    top = dict(image_token_index=IMAGE, video_token_index=VIDEO, vision_feature_select_strategy="full",
               vision_feature_layer=-1, vision_aspect_ratio="anyres_max_1",
               image_grid_pinpoints=[[22, 22], [22, 44], [44, 22], [44, 44], [22, 66], [66, 22]])
    if name == "even":
        text.update(num_hidden_layers=2, num_key_value_heads=4, tie_word_embeddings=True)
        vision.update(num_hidden_layers=3, num_attention_heads=4, image_size=16)
        top.update(vision_feature_layer=[-2, -1], vision_aspect_ratio="anyres_max_9", tie_word_embeddings=True,
                   image_grid_pinpoints=[[16, 16], [16, 32], [32, 16], [32, 32], [48, 16]])
    return dict(model_type="llava_onevision", text_config=text, vision_config=vision, **top)


def V(frames):
    return ("video", frames)


def I(h, w):  # noqa: E743
    return ("image", (h, w))


# name -> (config, segments): ints are random text lengths, tuples visuals.
CASES = {
    "odd-video-f3": ("odd", [5, V(3), 4]),
    "odd-image-wide": ("odd", [3, I(30, 50), 4]),  # 2x2 tiles, rows cropped, resized (anyres_max_1)
    "odd-image-tall": ("odd", [3, I(70, 25), 2]),  # 3x1 tiles, columns cropped, resized
    "odd-two-images": ("odd", [2, I(30, 50), 2, I(12, 10), 3]),  # multi-image: base tiles only
    "odd-image-video": ("odd", [2, I(10, 12), 3, V(2), 2]),  # single-tile anyres image + video
    "even-video-f2": ("even", [4, V(2), 3]),
    "even-image": ("even", [3, I(40, 20), 3]),  # 2x1 tiles, cropped, not resized (anyres_max_9)
    "even-image-video": ("even", [I(20, 30), 2, V(3), 4]),
}
GENERATE_CASES = ["odd-video-f3", "odd-image-wide", "odd-two-images", "even-video-f2", "even-image-video"]


@dataclasses.dataclass
class Loaded:
    hf: object
    ours: object
    path: object


def _build_hf(path, d, seed):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    d = copy.deepcopy(d)
    d.pop("model_type")
    torch.manual_seed(seed)
    hf = LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(**d)).eval()
    hf.save_pretrained(path)
    return hf


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            path = tmp_path_factory.mktemp(f"llava-{name}")
            hf = _build_hf(path, hf_config(name), seed=len(name))
            cache[name] = Loaded(hf, load_llava_onevision(path), path)
        return cache[name]

    return get


def build_prompt(cfg, segments, seed):
    rng = np.random.default_rng(seed)
    n_images = sum(1 for s in segments if isinstance(s, tuple) and s[0] == "image")
    S = cfg.vision.image_size
    parts = []
    for s in segments:
        if isinstance(s, int):
            parts.append(rng.integers(1, 280, s).tolist())
        elif s[0] == "video":
            parts.append(li.LlavaVisual("video", rng.standard_normal((s[1], 3, S, S)).astype(np.float32)))
        else:
            anyres = n_images == 1
            n = lo.num_tiles("image", cfg, image_hw=s[1], anyres=anyres)
            parts.append(li.LlavaVisual("image", rng.standard_normal((n, 3, S, S)).astype(np.float32), s[1], anyres))
    return li.build_prompt(parts, cfg)


def hf_inputs(p):
    kw = {"input_ids": torch.tensor(p.input_ids[None], dtype=torch.long),
          "attention_mask": torch.ones(1, len(p.input_ids), dtype=torch.long)}
    imgs = [v for v in p.visuals if v.kind == "image"]
    vids = [v for v in p.visuals if v.kind == "video"]
    if imgs:  # the image processor's layout: [images, max tiles, C, S, S] zero-padded
        n = max(v.pixel_values.shape[0] for v in imgs)
        pix = np.zeros((len(imgs), n) + imgs[0].pixel_values.shape[1:], np.float32)
        for i, v in enumerate(imgs):
            pix[i, :v.pixel_values.shape[0]] = v.pixel_values
        kw.update(pixel_values=torch.tensor(pix), image_sizes=torch.tensor([v.image_size for v in imgs]),
                  batch_num_images=torch.tensor([len(imgs)]))
    if vids:
        kw["pixel_values_videos"] = torch.tensor(np.stack([v.pixel_values for v in vids]))
    return kw


@partial(jax.jit, static_argnames=("graphdef",))
def _ours_forward(graphdef, params, batch):
    model = nnx.merge(graphdef, params)
    vis = model.encode_visuals(batch.pixels_PC, batch.vision_layout)
    h, _, captured = tg.forward(model, batch, capture=tuple(range(model.cfg.num_layers)))
    return vis, model.logits(h), [captured[i] for i in range(model.cfg.num_layers)] + [h]


def ours_forward(model, batch):
    return _ours_forward(*nnx.split(model), batch)


def maxerr(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


@pytest.fixture(scope="module")
def results(zoo):
    cache = {}

    def get(case):
        if case not in cache:
            cfg_name, segs = CASES[case]
            m = zoo(cfg_name)
            p = build_prompt(m.ours.cfg, segs, seed=sum(map(ord, case)))
            T = len(p.input_ids)
            vis, logits, hidden = ours_forward(m.ours, lo.prepare_prefill_batch([p], m.ours.cfg))
            kw = hf_inputs(p)
            with torch.no_grad():
                out = m.hf(**kw, output_hidden_states=True)
                hf_vis = {}
                if "pixel_values" in kw:
                    f = m.hf.model.get_image_features(kw["pixel_values"], kw["image_sizes"],
                                                      batch_num_images=kw["batch_num_images"])
                    hf_vis[1] = torch.cat(f.pooler_output).numpy()
                if "pixel_values_videos" in kw:
                    f = m.hf.model.get_video_features(kw["pixel_values_videos"])
                    hf_vis[2] = f.pooler_output.flatten(0, 1).numpy()
            types_vis = p.mm_token_type_ids[p.mm_token_type_ids != 0]
            cache[case] = types.SimpleNamespace(
                T=T, vis={k: np.asarray(vis)[:len(types_vis)][types_vis == k] for k in hf_vis}, hf_vis=hf_vis,
                logits=np.asarray(logits)[0, :T], hf_logits=out.logits[0].numpy(),
                hidden=[np.asarray(h)[0, :T] for h in hidden], hf_hidden=[x[0].numpy() for x in out.hidden_states])
        return cache[case]

    return get


# ----------------------------------------------------------------------------------- forward parity


def test_cases_cover_the_brief():
    cfgs = {n: lo.LlavaOneVisionConfig.from_hf_dict(hf_config(n)) for n in ("odd", "even")}
    assert {c.vision.grid % 2 for c in cfgs.values()} == {0, 1}
    assert {c.tie_word_embeddings for c in cfgs.values()} == {True, False}
    kinds = set()
    resized = cropped_only = multi = False
    for cfg_name, segs in CASES.values():
        cfg = cfgs[cfg_name]
        imgs = [s[1] for s in segs if isinstance(s, tuple) and s[0] == "image"]
        kinds |= {s[0] for s in segs if isinstance(s, tuple)}
        multi |= len(imgs) > 1
        for hw in imgs if len(imgs) == 1 else []:
            g = lo.anyres_geometry(hw, cfg)
            if g.num_tiles > 2:
                resized |= (g.out_h, g.out_w) != (g.r1 - g.r0, g.c1 - g.c0)
                cropped_only |= (g.out_h, g.out_w) == (g.r1 - g.r0, g.c1 - g.c0) != (g.nph * cfg.vision.grid,
                                                                                     g.npw * cfg.vision.grid)
    assert kinds == {"image", "video"} and resized and cropped_only and multi
    assert len(GENERATE_CASES) >= 5 and {CASES[c][0] for c in GENERATE_CASES} == {"odd", "even"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_matches_hf(results, case):
    """Visual tokens (image and video paths), every hidden state and the logits, fp32."""
    r = results(case)
    for k in r.hf_vis:
        assert maxerr(r.vis[k], r.hf_vis[k]) <= TOL, f"visual kind {k}"
    assert len(r.hidden) == len(r.hf_hidden)
    errs = [maxerr(a, b) for a, b in zip(r.hidden, r.hf_hidden)]
    assert max(errs) <= TOL, errs
    assert maxerr(r.logits, r.hf_logits) <= TOL


# ---------------------------------------------------------------------------------- greedy generate


def hf_greedy(hf, p, n):
    with torch.no_grad():
        out = hf.generate(**hf_inputs(p), max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                          pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(p.input_ids):].tolist(), np.stack([x[0].float().numpy() for x in out.logits])


def assert_greedy_equal(ours, ref, ref_logits):
    """Token-exact, except a divergence where HF's top-2 margin is a genuine near-tie."""
    assert len(ours) == len(ref) == MAX_NEW, (ours, ref)
    for k, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            top2 = np.sort(ref_logits[k])[-2:]
            assert top2[1] - top2[0] < NEAR_TIE and ref_logits[k][a] >= top2[0], (k, ours, ref)
            return


def generate_prompt(zoo, case):
    cfg_name, segs = CASES[case]
    return build_prompt(zoo(cfg_name).ours.cfg, segs, seed=sum(map(ord, case)) + 1)


@pytest.fixture(scope="module")
def hf_refs(zoo):
    cache = {}

    def get(case):
        if case not in cache:
            cache[case] = hf_greedy(zoo(CASES[case][0]).hf, generate_prompt(zoo, case), MAX_NEW)
        return cache[case]

    return get


@pytest.mark.parametrize("case", GENERATE_CASES)
def test_greedy_generate_matches_hf(zoo, hf_refs, case):
    ours = generate(zoo(CASES[case][0]).ours, [generate_prompt(zoo, case)], max_new_tokens=MAX_NEW, eos_ids=())[0]
    assert_greedy_equal(ours, *hf_refs(case))


def test_decode_logits_match_hf(zoo, hf_refs):
    """Teacher-forced on HF's greedy tokens: prefill's last logits and a chain `verify` at positions
    cache length + i (rope delta 0) reproduce HF generate's per-step logits."""
    case = "odd-image-video"
    model = zoo(CASES[case][0]).ours
    p = generate_prompt(zoo, case)
    ref, ref_logits = hf_refs(case)
    batch = lo.prepare_prefill_batch([p], model.cfg)
    graphdef, params = nnx.split(model)
    pre = tg.prefill(graphdef, params, batch, capacity=cache_capacity(batch.input_ids_BT.shape[1], MAX_NEW),
                     m_star=model.cfg.num_layers // 2)
    assert int(pre.rope_delta_B[0]) == 0
    n = MAX_NEW - 1
    pos = pre.cache.lengths_B[:, None] + jnp.arange(n)[None]
    chain = jnp.tril(jnp.ones((n, n), bool))
    out = tg.verify(graphdef, params, pre.cache, jnp.asarray([ref[:n]], jnp.int32), pos, chain)
    assert maxerr(np.asarray(pre.last_logits_BV)[0], ref_logits[0]) <= TOL
    assert maxerr(np.asarray(out.logits_BNV)[0], ref_logits[1:]) <= TOL


# ------------------------------------------------------------------------------------ token counts


def _hf_processor_counts(cfg):
    """transformers' LlavaOnevisionProcessor counting methods on a stand-in (no tokenizer needed)."""
    from transformers import LlavaOnevisionProcessor as P

    pins = [list(x) for x in cfg.image_grid_pinpoints]
    ns = types.SimpleNamespace(image_processor=types.SimpleNamespace(image_grid_pinpoints=pins),
                               num_image_tokens=cfg.vision.grid**2, vision_aspect_ratio=cfg.vision_aspect_ratio,
                               video_token="v")
    ns._get_unpadded_features = partial(P._get_unpadded_features, ns)
    S = cfg.vision.image_size
    image = lambda h, w: P._get_number_of_features(ns, h, w, S, S)  # noqa: E731
    video = lambda f: len(P.replace_video_token(ns, {"pixel_values_videos": [np.zeros((f, 3, S, S))]}, 0))  # noqa: E731
    return image, video


@pytest.mark.parametrize("cfg_name", ["odd", "even"])
def test_token_counts_match_hf_processor(cfg_name):
    cfg = lo.LlavaOneVisionConfig.from_hf_dict(hf_config(cfg_name))
    image, video = _hf_processor_counts(cfg)
    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, 130, size=(60, 2))] + [(20, 20), (1, 200), (200, 1)]
    for hw in sizes:
        assert lo.num_visual_tokens("image", cfg, image_hw=hw) == image(*hw), hw
    for f in (1, 2, 7):
        assert lo.num_visual_tokens("video", cfg, num_frames=f) == video(f)
    assert lo.num_visual_tokens("image", cfg, image_hw=(30, 50), anyres=False) == cfg.vision.grid**2 + 1


def test_7b_config_counts():
    """configs/llava_ov_7b.json: SigLIP 384/14 -> 27x27 features per tile, 14x14 pooled per frame."""
    path = os.path.join(os.path.dirname(__file__), "..", "configs", "llava_ov_7b.json")
    with open(path) as f:
        cfg = registry.config_from_dict(json.load(f), path)
    assert cfg.family == "llava_onevision" and cfg.vision.grid == 27 and cfg.num_layers == 28
    assert lo.num_visual_tokens("video", cfg, num_frames=32) == 32 * 196 + 1
    image, video = _hf_processor_counts(cfg)
    for hw in [(480, 640), (1080, 1920), (300, 300), (2000, 500)]:
        assert lo.num_visual_tokens("image", cfg, image_hw=hw) == image(*hw)


# ----------------------------------------------------------------------------------- preprocessing


def test_image_preprocessing_matches_hf_pil_processor(zoo):
    from PIL import Image
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    cfg = zoo("odd").ours.cfg
    S = cfg.vision.image_size
    ip = LlavaOnevisionImageProcessorPil(size={"height": S, "width": S}, image_mean=list(li.SIGLIP_MEAN),
                                         image_std=list(li.SIGLIP_STD),
                                         image_grid_pinpoints=[list(x) for x in cfg.image_grid_pinpoints])
    rng = np.random.default_rng(1)
    for hw in [(30, 50), (70, 25), (10, 12), (41, 39)]:
        arr = rng.integers(0, 256, hw + (3,), dtype=np.uint8)
        ref = ip(images=[Image.fromarray(arr)], return_tensors="np")
        v = li.preprocess_image(arr, cfg)
        np.testing.assert_allclose(v.pixel_values, ref["pixel_values"][0], atol=1e-6)
        assert v.image_size == tuple(ref["image_sizes"][0])
        multi = ip(images=[[Image.fromarray(arr), Image.fromarray(arr)]], return_tensors="np")
        np.testing.assert_allclose(li.preprocess_image(arr, cfg, anyres=False).pixel_values, multi["pixel_values"][0],
                                   atol=1e-6)
        # a video frame is preprocessed like the base tile of that frame
        frames = li.preprocess_video_frames(np.stack([arr, arr[::-1]]), cfg)
        np.testing.assert_allclose(frames.pixel_values[0], ref["pixel_values"][0, 0], atol=1e-6)


def test_raw_image_prompt_end_to_end_matches_hf(zoo):
    """Raw image -> our preprocessing + prompt -> our logits equal HF's on the same inputs."""
    m = zoo("odd")
    cfg = m.ours.cfg
    arr = np.random.default_rng(2).integers(0, 256, (33, 47, 3), dtype=np.uint8)
    p = li.build_prompt([[5, 6, 7], li.preprocess_image(arr, cfg), [8, 9]], cfg)
    _, logits, _ = ours_forward(m.ours, lo.prepare_prefill_batch([p], cfg))
    with torch.no_grad():
        ref = m.hf(**hf_inputs(p)).logits[0].numpy()
    assert maxerr(np.asarray(logits)[0, :len(p.input_ids)], ref) <= TOL


def test_prompt_rules(zoo):
    cfg = zoo("odd").ours.cfg
    S = cfg.vision.image_size
    one = li.LlavaVisual("image", np.zeros((1, 3, S, S), np.float32), (30, 50), anyres=False)
    with pytest.raises(ValueError, match="anyres=True"):
        li.build_prompt([[1], one], cfg)
    with pytest.raises(ValueError, match="placeholder"):
        li.build_prompt([[1, IMAGE]], cfg)
    wrong_tiles = li.LlavaVisual("image", np.zeros((2, 3, S, S), np.float32), (30, 50))
    with pytest.raises(ValueError, match="needs 5 tiles"):
        lo.prepare_prefill_batch([li.build_prompt([[1], wrong_tiles], cfg)], cfg)


# ------------------------------------------------------------------------------------------ loading


def _rewrite(src, dst, rename):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    save_file({rename(k): v for k, v in load_file(src / "model.safetensors").items()}, dst / "model.safetensors")


def _params(model):
    return {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _in_memory(k):
    for a, b in (("language_model.lm_head.", "lm_head."), ("language_model.model.", "model.language_model."),
                 ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."),
                 ("image_newline", "model.image_newline")):
        if k.startswith(a):
            return b + k[len(a):]
    raise AssertionError(k)


def test_both_key_layouts_load_identically(zoo, tmp_path):
    from transformers import LlavaOnevisionForConditionalGeneration

    m = zoo("odd")
    keys = set(load_file(m.path / "model.safetensors"))
    assert "language_model.lm_head.weight" in keys and "vision_tower.encoder.layers.0.mlp.fc1.weight" in keys
    want = _params(m.ours)
    hub = lambda k: k.replace("vision_tower.", "vision_tower.vision_model.")  # noqa: E731
    for name, rename in (("in-memory", _in_memory), ("hub", hub)):
        _rewrite(m.path, tmp_path / name, rename)
        got = _params(load_llava_onevision(tmp_path / name))
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{name}: {k}")
    # the hub layout is one transformers itself reads
    _, info = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "hub", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_tied_embeddings_have_no_lm_head(zoo):
    m = zoo("even")
    assert not any("lm_head" in k for k in load_file(m.path / "model.safetensors"))
    assert m.ours.lm_head is None and m.ours.cfg.tie_word_embeddings


def test_loader_errors_name_the_key(zoo, tmp_path):
    m = zoo("odd")
    sd = load_file(m.path / "model.safetensors")
    cfg_text = (m.path / "config.json").read_text()

    def write(name, tensors, cfg=cfg_text):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(cfg)
        save_file(tensors, d / "model.safetensors")
        return d

    k = "vision_tower.encoder.layers.1.self_attn.k_proj.bias"
    with pytest.raises(CheckpointError, match="missing weight key.*" + k.replace(".", r"\.")):
        load_llava_onevision(write("missing", {a: b for a, b in sd.items() if a != k}))
    with pytest.raises(CheckpointError, match="unexpected weight key.*extra_thing"):
        load_llava_onevision(write("extra", {**sd, "extra_thing.weight": np.zeros(2, np.float32)}))
    with pytest.raises(CheckpointError, match=r"image_newline has shape \(63,\).*\(64,\)"):
        load_llava_onevision(write("shape", {**sd, "image_newline": np.zeros(63, np.float32)}))
    d = json.loads(cfg_text)
    d["text_config"]["intermediate_size"] = 96
    with pytest.raises(CheckpointError, match=r"layers\.\d\.mlp\.\w+_proj\.weight has shape .*config\.json implies"):
        load_llava_onevision(write("cfg", sd, json.dumps(d)))
    d = json.loads(cfg_text)
    d["vision_feature_select_strategy"] = "default"
    with pytest.raises(ConfigError, match="vision_feature_select_strategy"):
        load_llava_onevision(write("strategy", sd, json.dumps(d)))
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        registry.config_from_dict({"model_type": "llama"})


def test_save_round_trip_and_registry(zoo, tmp_path):
    """ours -> save_llava_onevision -> transformers and registry.load_target: same logits."""
    from transformers import LlavaOnevisionForConditionalGeneration

    m = zoo("even")
    save_llava_onevision(m.ours, tmp_path / "rt")
    hf = LlavaOnevisionForConditionalGeneration.from_pretrained(tmp_path / "rt").eval()
    again = registry.load_target(tmp_path / "rt")
    assert isinstance(again, lo.LlavaOneVision)
    p = build_prompt(m.ours.cfg, CASES["even-image-video"][1], seed=9)
    _, ours, _ = ours_forward(again, lo.prepare_prefill_batch([p], again.cfg))
    with torch.no_grad():
        ref = hf(**hf_inputs(p)).logits[0].numpy()
    assert maxerr(np.asarray(ours)[0, :len(p.input_ids)], ref) <= TOL
    assert registry.prepare_batch_for(again.cfg) is lo.prepare_prefill_batch
    # the same entry points dispatch Qwen2.5-VL directories to the existing loader and builder
    import _tiny
    from sparrow_jax.io.hf_checkpoint import save_qwen2_5_vl
    from sparrow_jax.models import qwen2_5_vl

    save_qwen2_5_vl(_tiny.random_model(), tmp_path / "qwen")
    q = registry.load_target(tmp_path / "qwen")
    assert isinstance(q, qwen2_5_vl.Qwen25VL) and registry.prepare_batch_for(q.cfg) is qwen2_5_vl.prepare_prefill_batch


# --------------------------------------------------------------------------- speculative decoding

SMALL_VOCAB, SMALL_TEXT = 24, 20  # text ids 1..19, image 22, video 23
MAX_NEW_SPEC = 16


@pytest.fixture(scope="module")
def small_target():
    """Pure-JAX random LLaVA-OV (G = 4, 24-token vocab), weights scaled up for clear argmax margins."""
    d = hf_config("even")
    d["text_config"].update(vocab_size=SMALL_VOCAB, tie_word_embeddings=False)
    d.update(image_token_index=22, video_token_index=23, tie_word_embeddings=False)
    model = lo.LlavaOneVision(lo.LlavaOneVisionConfig.from_hf_dict(d), rngs=nnx.Rngs(3))
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    nnx.update(model, nnx.from_flat_state(
        [(p, v.replace(v[...] * 2.0) if p[-1] in ("kernel", "embedding") else v) for p, v in flat]))
    return model


def small_prompts(cfg, seed, n):
    rng = np.random.default_rng(seed)
    S = cfg.vision.image_size
    text = lambda k: rng.integers(1, SMALL_TEXT, k).tolist()  # noqa: E731
    out = []
    for i in range(n):
        if i % 3 == 2:  # two images (base tiles): 2 x 17 tokens
            vis = [li.LlavaVisual("image", rng.standard_normal((1, 3, S, S)).astype(np.float32), (20, 30), False),
                   li.LlavaVisual("image", rng.standard_normal((1, 3, S, S)).astype(np.float32), (30, 20), False)]
        else:  # a video of 1-4 frames: 4 f + 1 tokens
            vis = [li.LlavaVisual("video", rng.standard_normal((int(rng.integers(1, 5)), 3, S, S)).astype(np.float32))]
        out.append(li.build_prompt([text(int(rng.integers(2, 8)))] + vis + [text(int(rng.integers(1, 5)))], cfg))
    return out


def distill(target, draft, prompts, continuations, *, steps=60, lr=3e-3):
    """A few teacher-forced steps on the target's own greedy continuations (as tests/_distill.py,
    with this family's batch builder): soft CE to the target's next-token law + SmoothL1 on hidden."""
    specials = (target.cfg.image_token_id, target.cfg.video_token_id)  # a generated placeholder id is not a visual
    seqs = [dataclasses.replace(p, input_ids=np.concatenate([p.input_ids, [1 if t in specials else t for t in c]]),
                                mm_token_type_ids=np.concatenate([p.mm_token_type_ids, np.zeros(len(c), np.int32)]))
            for p, c in zip(prompts, continuations)]
    batch = lo.prepare_prefill_batch(seqs, target.cfg)
    idx, dlen, _ = E.draft_positions(seqs, "text_only", batch.input_ids_BT.shape[1])
    batch = dataclasses.replace(batch, draft_idx_BP=idx, draft_len_B=dlen)
    tgraph, tparams = nnx.split(target)
    pre = tg.prefill(tgraph, tparams, batch, capacity=batch.input_ids_BT.shape[1], m_star=1)
    h_t = tg._gather_rows(tg.forward(target, batch)[0], idx)  # the target's states at the draft's items: its targets
    p_t = jax.nn.softmax(target.logits(h_t), -1)
    valid = (jnp.arange(idx.shape[1])[None] < dlen[:, None]).astype(jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(idx.shape[1])[None], idx.shape)
    mask = attn_lib.MaskSpec(kv_len_B=dlen, causal=True)
    dgraph, dparams = nnx.split(draft)
    opt = optax.adam(lr)

    def loss_fn(dp):
        out, _ = nnx.merge(dgraph, dp)(pre.draft_e_BPD, pre.draft_hprev_BPD, pos, mask)
        ce = -(p_t * jax.nn.log_softmax(nnx.merge(tgraph, tparams).logits(out), -1)).sum(-1)
        l1 = optax.huber_loss(out, h_t).mean(-1)
        return ((1.1 * ce + l1) * valid).sum() / valid.sum()

    @jax.jit
    def step(dp, st):
        g = jax.grad(loss_fn)(dp)
        upd, st = opt.update(g, st, dp)
        return optax.apply_updates(dp, upd), st

    st = opt.init(dparams)
    for _ in range(steps):
        dparams, st = step(dparams, st)
    nnx.update(draft, dparams)


@pytest.fixture(scope="module")
def engine_prompts(small_target):
    ps = small_prompts(small_target.cfg, 0, 4)
    assert max(len(p.input_ids) for p in ps) <= tg.SEQ_BUCKET  # one padding bucket: one compile
    return ps


@pytest.fixture(scope="module")
def ar_reference(small_target, engine_prompts):
    return generate(small_target, engine_prompts, max_new_tokens=MAX_NEW_SPEC, eos_ids=())


@pytest.fixture(scope="module")
def drafts(small_target, engine_prompts, ar_reference):
    """A random draft, and one distilled on the target's AR continuations of the test prompts (the
    point is a draft that is accepted often, so multi-token acceptance is exercised)."""
    cfg = small_target.cfg
    random_draft = SparrowDraft(DraftConfig.for_target(cfg), rngs=nnx.Rngs(11))
    trained = SparrowDraft(DraftConfig.for_target(cfg), rngs=nnx.Rngs(12))
    distill(small_target, trained, engine_prompts, ar_reference)
    return {"random": random_draft, "trained": trained}


def assert_lossless(target, prompt, spec, ref):
    """Token-identical, unless the first difference is a genuine near-tie of the target."""
    if spec == ref:
        return
    i = next((j for j, (a, b) in enumerate(zip(spec, ref)) if a != b), min(len(spec), len(ref)))
    q = dataclasses.replace(prompt, input_ids=np.concatenate([prompt.input_ids, np.asarray(ref[:i], np.int32)]),
                            mm_token_type_ids=np.concatenate([prompt.mm_token_type_ids, np.zeros(i, np.int32)]))
    h, _, _ = tg.forward(target, lo.prepare_prefill_batch([q], target.cfg))
    top2 = np.sort(np.asarray(target.logits(h)[0, len(q.input_ids) - 1]))[-2:]
    assert top2[1] - top2[0] < 1e-5, f"speculative {spec} != AR {ref} at step {i}"


@pytest.mark.parametrize("which", ["random", "trained"])
@pytest.mark.parametrize("mode", ["text_only", "full_visual"])
def test_speculative_decoding_is_lossless(small_target, drafts, engine_prompts, ar_reference, mode, which):
    """Greedy speculative decoding (LLaVA-OV paper tree 30-4-8, batch of 4 rows with videos and
    multi-image prompts) is token-identical to the target's AR decoding."""
    cfg = E.EngineConfig(tree=TreeSpec.parse("30-4-8"), max_new_tokens=MAX_NEW_SPEC)
    # Losslessness holds for any draft in any view: these text-only (view none) drafts run in both modes.
    toks, res = E.generate(small_target, drafts[which], engine_prompts, cfg, mode=mode, allow_view_mismatch=True)
    for p, t, ref in zip(engine_prompts, toks, ar_reference):
        assert_lossless(small_target, p, t, ref)
    a = np.asarray(res.accepted_BR)
    if which == "trained":
        tau = float(a[a > 0].mean())
        assert tau > 1.5, f"trained draft should be accepted often (tau {tau:.2f})"


def test_decode_cli_runs_llava_target(zoo, tmp_path):
    """decode.py loads the target by model_type (registry) and decodes a real video file with the
    LLaVA family's preprocessing and batch builder; speculative output equals AR."""
    import sys

    from sparrow_jax.synthetic.video import random_scene, render_frames, write_video

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    import decode

    frames = render_frames(random_scene(np.random.default_rng(0)), num_frames=6, fps=4, height=40, width=56)
    video = write_video(tmp_path / "clip.mp4", frames, fps=4)
    out = tmp_path / "out.jsonl"
    decode.main(["--target", str(zoo("odd").path), "--video", str(video), "--prompt", "Hi?", "--num-frames", "3",
                 "--max-new-tokens", "6", "--tree", "10-3-3", "--compare-ar", "--jsonl", str(out)])
    (row,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert row["outputs_identical_to_ar"] is True and len(row["tokens"]) == 6
    assert row["visual_tokens"] == lo.num_visual_tokens("video", zoo("odd").ours.cfg, num_frames=3)


# ------------------------------------------------------------------------------------ draft training


def test_online_and_offline_features_give_the_same_loss_on_llava():
    """Online rows (tiles as tower units, each row's bilinear taps combined row by row) == offline
    extraction (the whole batch's tiles and taps at once): the same draft loss and metrics."""
    d = hf_config("even")
    d["text_config"].update(vocab_size=SMALL_VOCAB, tie_word_embeddings=False)
    d.update(image_token_index=22, video_token_index=23, tie_word_embeddings=False)
    tcfg = lo.LlavaOneVisionConfig.from_hf_dict(d)
    target = registry.build_target(tcfg, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(1)
    samples = [Sample(p, tuple(rng.integers(1, SMALL_TEXT, 8).tolist())) for p in small_prompts(tcfg, 6, 4)]
    spec, slots = FeatureSpec(m_star=1), SlotSpec("ivsb_mid")
    off = jax.tree.map(jnp.asarray, collate(records_for(target, samples, spec=spec), L=32, M=64, spec=slots))
    on = fill_features(target, online_batch(samples, tcfg, L=32, M=64, slots=slots), spec)
    draft = SparrowDraft(DraftConfig.for_target(tcfg), rngs=nnx.Rngs(0))
    l_off, m_off = draft_loss(draft, target.embed, target.logits, off, LossConfig())
    l_on, m_on = draft_loss(draft, target.embed, target.logits, on, LossConfig())
    assert abs(float(l_off) - float(l_on)) <= 1e-5
    for k in m_off:
        assert abs(float(m_off[k]) - float(m_on[k])) <= 1e-5, k


def test_sparrow_draft_training_steps_lower_the_loss_on_llava(tmp_path):
    """A few online training steps of a Sparrow draft against a LLaVA-OV target (IVSB + MTP on)."""
    import json

    from sparrow_jax.training.data import Sample
    from sparrow_jax.training.trainer import TrainConfig, Trainer

    d = hf_config("even")
    d["text_config"].update(vocab_size=SMALL_VOCAB, tie_word_embeddings=False)
    d.update(image_token_index=22, video_token_index=23, tie_word_embeddings=False)
    (tmp_path / "llava.json").write_text(json.dumps(d))
    tcfg = lo.LlavaOneVisionConfig.from_hf_dict(d)
    rng = np.random.default_rng(0)
    samples = [Sample(p, tuple(rng.integers(1, SMALL_TEXT, 8).tolist())) for p in small_prompts(tcfg, 5, 8)]
    cfg = TrainConfig.from_file_and_overrides(None, [
        f"target_config={tmp_path / 'llava.json'}", "online=true", "steps=15", "global_batch=4", "max_text=32",
        "max_visual=64", "lr=0.003", "warmup=2", "log_every=1", "save_every=100", "tensorboard=false",
        f"out_dir={tmp_path / 'run'}", "m_star=1"])
    tr = Trainer(cfg, samples=samples)
    assert tr.target.cfg.family == "llava_onevision"
    hist = tr.run(progress=False)
    assert hist[-1]["loss"] < 0.8 * hist[0]["loss"], (hist[0]["loss"], hist[-1]["loss"])

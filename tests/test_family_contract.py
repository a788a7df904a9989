"""Every registered target family fulfils the `family.TargetFamily` contract: its fields are present and
callable, its config round-trips through config.json under its own `model_type`, a tiny random model
built through the table answers the speculation hooks with the right shapes, its chunked visual encoding
equals the one-call encoding, and save -> load through the table gives the same parameters. An unknown
`model_type` is a ConfigError naming the file."""

from __future__ import annotations

import copy
import dataclasses
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import _tiny
from sparrow_jax.io.text import ByteCodec
from sparrow_jax.models import attention as attn_lib
from sparrow_jax.models import registry
from sparrow_jax.models import target as tg
from sparrow_jax.models.config_io import ConfigError
from sparrow_jax.models.family import TargetFamily

LLAVA = dict(model_type="llava_onevision", image_token_index=290, video_token_index=291,
             vision_feature_select_strategy="full", vision_feature_layer=-1, vision_aspect_ratio="anyres_max_1",
             image_grid_pinpoints=[[28, 28]],
             text_config=dict(model_type="qwen2", vocab_size=300, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=4096, rope_theta=10000.0),
             vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=7,
                                vision_use_head=False))
TINY = {"qwen2_5_vl": _tiny.BASE_HF_CONFIG, "llava_onevision": LLAVA}
CALLABLES = ("config_cls", "module_cls", "load", "save", "prepare_prefill_batch", "rope_delta", "visual_readers",
             "chat_prompt", "blank_video")


def test_every_family_has_a_tiny_config_here():
    assert set(TINY) == set(registry.FAMILIES)


@pytest.mark.parametrize("model_type", sorted(registry.FAMILIES))
def test_fields(model_type):
    fam = registry.FAMILIES[model_type]
    assert isinstance(fam, TargetFamily) and fam.model_type == model_type and fam.name
    for f in dataclasses.fields(fam):
        assert getattr(fam, f.name) is not None, f.name
    for name in CALLABLES:
        assert callable(getattr(fam, name)), name
    for m in ("from_hf_dict", "to_hf_dict"):
        assert callable(getattr(fam.config_cls, m)), m
    assert all(isinstance(k, str) for k in fam.video_options)
    assert set(fam.video_options) <= set(registry.VIDEO_OPTIONS)
    fam.frames_note.format_map({k: k for k in registry.VIDEO_OPTIONS})  # its fields are option names
    for mark, field in fam.tokenizer_marks:
        assert isinstance(mark, str) and (field is None or isinstance(field, str))


def test_missing_field_is_refused():
    fam = registry.FAMILIES["qwen2_5_vl"]
    with pytest.raises(TypeError, match="qwen2_5_vl.*load is missing"):
        dataclasses.replace(fam, load=None)


@pytest.mark.parametrize("model_type", sorted(registry.FAMILIES))
def test_config_round_trip(model_type):
    """config.json -> config -> to_hf_dict -> the same config, of the family keyed by its model_type."""
    cfg = registry.config_from_dict(copy.deepcopy(TINY[model_type]), "tiny.json")
    fam = registry.family_of(cfg)
    assert fam is registry.FAMILIES[model_type] and isinstance(cfg, fam.config_cls) and cfg.family == model_type
    d = cfg.to_hf_dict()
    assert d["model_type"] == model_type
    assert registry.config_from_dict(d, "again.json") == cfg


def _prompt(fam, cfg, frames: int, side: int = 56):
    visual, video_ids = fam.blank_video(cfg, frames, side)
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal(visual.pixel_values.shape).astype(np.float32)
    visual = types.SimpleNamespace(**{**vars(visual), "pixel_values": pixels})
    text = rng.integers(1, 200, 6).tolist()
    ids = text[:3] + video_ids + text[3:]
    kinds = [0] * 3 + [2 if t == cfg.video_token_id else 0 for t in video_ids] + [0] * 3
    return types.SimpleNamespace(input_ids=np.asarray(ids, np.int64), mm_token_type_ids=np.asarray(kinds),
                                 visuals=(visual,))


@pytest.fixture(scope="module", params=sorted(registry.FAMILIES))
def built(request):
    cfg = registry.config_from_dict(copy.deepcopy(TINY[request.param]), "tiny.json")
    model = registry.build_target(cfg, rngs=nnx.Rngs(0))
    fam = registry.family_of(cfg)
    prompts = [_prompt(fam, cfg, 4), _prompt(fam, cfg, 2)]
    return fam, cfg, model, registry.prepare_batch_for(cfg)(prompts, cfg), prompts


def test_hooks_shapes(built):
    fam, cfg, model, batch, _ = built
    t = cfg.text
    B, T = batch.input_ids_BT.shape
    H, K, E, D = t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.hidden_size
    x = model.embed(batch.input_ids_BT)
    assert x.shape == (B, T, D)
    cos, sin = model.rope(batch.positions_3BT)
    assert cos.shape == sin.shape == (B, T, E)
    mask = attn_lib.MaskSpec(kv_len_B=batch.lengths_B, causal=True)
    h, kvs, captured = model.decoder(x, cos, sin, mask, capture=(0, 1))
    assert h.shape == (B, T, D) and set(captured) == {0, 1} and len(kvs) == cfg.num_layers
    assert all(k.shape == v.shape == (B, T, K, E) for k, v in kvs)
    assert model.layer_queries(1, captured[1], cos, sin).shape == (B, T, H, E)
    assert model.logits(h).shape == (B, T, t.vocab_size)
    feats = model.encode_visuals(jnp.asarray(batch.pixels_PC), batch.vision_layout)
    assert feats.shape == (batch.visual_dest.shape[0], D)


def test_chunked_visuals_equal_one_call(built):
    """visual_chunks -> encode_chunk -> combine_chunks (bounded memory) gives encode_visuals' tokens."""
    _, _, model, batch, _ = built
    graphdef, params = nnx.split(model)
    whole = model.encode_visuals(jnp.asarray(batch.pixels_PC), batch.vision_layout)
    chunked = tg.encode_visuals_chunked(graphdef, params, batch.pixels_PC, batch.vision_layout, chunk_patches=1)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(whole), rtol=1e-5, atol=1e-5)


def test_chunks_grown_to_a_larger_size_keep_their_outputs(built):
    """Chunks of different sizes (frames of 28 and 84 pixels) grown to their elementwise largest
    `chunk_dims` by `pad_chunk` and run stacked (vmapped, as online training does): each chunk's first
    `valid` output rows are those of the chunk run alone."""
    fam, cfg, model, _, _ = built
    batch = registry.prepare_batch_for(cfg)([_prompt(fam, cfg, 2, 28), _prompt(fam, cfg, 2, 84)], cfg)
    chunks = list(model.visual_chunks(np.asarray(batch.pixels_PC), batch.vision_layout, 1))
    dims = np.max([model.chunk_dims(px, layout) for px, layout, _ in chunks], axis=0).astype(int)
    grown = [model.pad_chunk(px, layout, tuple(dims)) for px, layout, _ in chunks]
    stacked = jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *grown)
    out = jax.vmap(model.encode_chunk)(*stacked)
    for (px, layout, valid), o in zip(chunks, out):
        alone = model.encode_chunk(jnp.asarray(px), layout)
        np.testing.assert_allclose(np.asarray(o[:valid]), np.asarray(alone[:valid]), rtol=1e-5, atol=1e-5)
    if cfg.family == "qwen2_5_vl":  # two frame sizes: the small chunks were grown
        assert len({np.shape(px) for px, _, _ in chunks}) == 2


def test_attention_scores_are_a_distribution(built):
    """layer_queries feeds last_token_attention: each row a distribution over its own prompt."""
    _, cfg, model, batch, _ = built
    x = tg._input_embeddings(model, batch, attn_lib.XLA)
    cos, sin = model.rope(batch.positions_3BT)
    mask = attn_lib.MaskSpec(kv_len_B=batch.lengths_B, causal=True)
    _, kvs, captured = model.decoder(x, cos, sin, mask, capture=(1,))
    p = np.asarray(tg.last_token_attention(model, batch, captured[1], kvs[1][0], 1))
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-5)
    for b, n in enumerate(np.asarray(batch.lengths_B)):
        assert (p[b, n:] == 0).all()


def test_rope_delta_matches_the_batch(built):
    fam, cfg, _, batch, prompts = built
    assert [fam.rope_delta(p, cfg) for p in prompts] == np.asarray(batch.rope_delta_B).tolist()


def test_text_only_chat_prompt(built):
    fam, cfg, _, _, _ = built
    p = fam.chat_prompt(cfg, ByteCodec(cfg.text.vocab_size), None, "hi")
    assert len(p.input_ids) > 0 and not np.asarray(p.mm_token_type_ids).any()


def test_save_load_round_trip(built, tmp_path):
    _, cfg, model, _, _ = built
    registry.save_target(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == cfg.family
    back = registry.load_target(tmp_path)
    assert back.cfg == cfg
    ours, theirs = (nnx.to_flat_state(nnx.state(m, nnx.Param)) for m in (model, back))
    assert [p for p, _ in ours] == [p for p, _ in theirs]
    for (p, a), (_, b) in zip(ours, theirs):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(p))


def test_unknown_model_type_names_the_file(tmp_path):
    d = copy.deepcopy(_tiny.BASE_HF_CONFIG)
    d["model_type"] = "qwen3_vl"
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'config.json'}: model_type 'qwen3_vl' is not a supported "
                                          r"target family \['qwen2_5_vl', 'llava_onevision'\]"):
        registry.load_target(tmp_path)
    with pytest.raises(ConfigError, match="SimpleNamespace: model_type None"):
        registry.family_of(types.SimpleNamespace())


"""Tiny Qwen2.5-VL configs, checkpoints and prompts for tests (importable from every test module)."""

from __future__ import annotations

import copy
import types

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparrow_jax.models.qwen2_5_vl import Qwen25VL, Qwen25VLConfig
from sparrow_jax.synthetic.samples import synthetic_samples

VOCAB = 300
IMAGE, VIDEO, VSTART, VEND = 290, 291, 292, 293

BASE_HF_CONFIG = {
    "model_type": "qwen2_5_vl",
    "image_token_id": IMAGE, "video_token_id": VIDEO, "vision_start_token_id": VSTART, "vision_end_token_id": VEND,
    "tie_word_embeddings": False,
    "text_config": {
        "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096, "initializer_range": 0.05, "bos_token_id": None, "eos_token_id": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    },
    "vision_config": {
        "depth": 3, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 14,
        "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56, "out_hidden_size": 64,
        "fullatt_block_indexes": [1], "tokens_per_second": 2, "initializer_range": 0.05,
    },
}


def hf_config_dict(text=None, vision=None, **top):
    d = copy.deepcopy(BASE_HF_CONFIG)
    d["text_config"].update(text or {})
    d["vision_config"].update(vision or {})
    d.update(top)
    return d


def save_hf_checkpoint(path, cfg_dict=None, seed=0, dtype="float32"):
    """Build a random transformers Qwen2.5-VL from `cfg_dict` and `save_pretrained` it (needs torch)."""
    import torch  # noqa: PLC0415
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # noqa: PLC0415

    d = copy.deepcopy(cfg_dict or BASE_HF_CONFIG)
    d.pop("model_type", None)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**d)).eval()
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    model.save_pretrained(path)
    return model


def our_config(cfg_dict=None) -> Qwen25VLConfig:
    return Qwen25VLConfig.from_hf_dict(copy.deepcopy(cfg_dict or BASE_HF_CONFIG))


def random_model(cfg: Qwen25VLConfig | None = None, seed=0, scale=2.5) -> Qwen25VL:
    """A pure-JAX random target. Weights are scaled up from the 0.02 init so greedy argmax margins are
    wide (random tiny models otherwise sit near ties)."""
    model = Qwen25VL(cfg or our_config(), rngs=nnx.Rngs(seed))
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    nnx.update(model, nnx.from_flat_state(
        [(p, v.replace(v[...] * scale) if p[-1] in ("kernel", "embedding") else v) for p, v in flat]))
    return model


def visual(rng, grid, kind="video", second_per_grid_t=1.0, patch_dim=3 * 2 * 14 * 14):
    t, h, w = grid
    pix = rng.standard_normal((t * h * w, patch_dim)).astype(np.float32)
    return types.SimpleNamespace(kind=kind, pixel_values=pix, grid_thw=tuple(grid), second_per_grid_t=second_per_grid_t,
                                 num_tokens=t * h * w // 4)


def prompt(segments, cfg: Qwen25VLConfig | None = None):
    """segments: list of int lists (text ids) and visuals -> prompt object with ids and types."""
    image, video, vstart, vend = ((cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id,
                                   cfg.vision_end_token_id) if cfg else (IMAGE, VIDEO, VSTART, VEND))
    ids, tt, vis = [], [], []
    for s in segments:
        if isinstance(s, types.SimpleNamespace) or hasattr(s, "grid_thw"):
            pad, code = (video, 2) if s.kind == "video" else (image, 1)
            ids += [vstart] + [pad] * s.num_tokens + [vend]
            tt += [0] + [code] * s.num_tokens + [0]
            vis.append(s)
        else:
            ids += list(s)
            tt += [0] * len(s)
    return types.SimpleNamespace(input_ids=np.asarray(ids, np.int32), mm_token_type_ids=np.asarray(tt, np.int32),
                                 visuals=tuple(vis))


def random_text(rng, n, vocab=280):
    return rng.integers(1, vocab, size=n).tolist()


# A 24-token vocabulary (20 text tokens + 4 vision specials): joint distributions of a few generated
# tokens have few enough cells for chi-square tests, and drafts learn it in a few steps.
SMALL_VOCAB_CONFIG = hf_config_dict(text={"vocab_size": 24}, image_token_id=20, video_token_id=21,
                                    vision_start_token_id=22, vision_end_token_id=23)
SMALL_TEXT_VOCAB = 20


def feature_samples(target_cfg, n: int, *, seed: int = 0):
    """A sample source (`data: "_tiny:feature_samples"`) giving test_training's feature-dir samples
    whatever the data seed, so an online run shuffles them exactly as an offline run of that seed."""
    return synthetic_samples(target_cfg, n, seed=2, text_vocab=SMALL_TEXT_VOCAB)


def fp32(x):
    return np.asarray(jnp.asarray(x, jnp.float32))


def write_cli_files(d, num_frames: int = 8):
    """decode.py CLI fixtures in directory d: the tiny target's config.json and a 56 px mp4 clip.
    Returns (config path, video path)."""
    import json
    from pathlib import Path

    from sparrow_jax.synthetic.video import random_scene, render_frames, write_video

    cfg = Path(d) / "tiny_config.json"
    cfg.write_text(json.dumps(BASE_HF_CONFIG))
    frames = render_frames(random_scene(np.random.default_rng(0)), num_frames=num_frames, fps=4, height=56, width=56)
    return cfg, write_video(Path(d) / "clip.mp4", frames, fps=4)

"""sparrow_jax.io.hf_checkpoint: loading and saving HF Qwen2.5-VL checkpoint directories.

Covers single-file and sharded checkpoints (ours and transformers'), both key layouts (on-disk
`model.layers.*` / `visual.*` and transformers' in-memory `model.language_model.*` / `model.visual.*`),
a transformers -> ours -> transformers round trip, and every malformed-directory error.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
import shutil
from functools import partial

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import _tiny  # noqa: E402
from sparrow_jax.io.hf_checkpoint import CheckpointError, load_qwen2_5_vl, save_qwen2_5_vl  # noqa: E402
from sparrow_jax.models import target as tg  # noqa: E402
from sparrow_jax.models.qwen2_5_vl import ConfigError, prepare_prefill_batch  # noqa: E402

CFG = _tiny.hf_config_dict()
SAFETENSORS = "model.safetensors"
INDEX = "model.safetensors.index.json"


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A transformers-written single-file checkpoint: (directory, HF model)."""
    path = tmp_path_factory.mktemp("hf-base")
    hf = _tiny.save_hf_checkpoint(path, CFG, seed=11)
    assert (path / SAFETENSORS).is_file() and not (path / INDEX).exists()
    return path, hf


@pytest.fixture(scope="module")
def base_model(base):
    return load_qwen2_5_vl(base[0])


@pytest.fixture(scope="module")
def prompt():
    rng = np.random.default_rng(5)
    return _tiny.prompt([
        _tiny.random_text(rng, 4), _tiny.visual(rng, (1, 4, 6), kind="image"), _tiny.random_text(rng, 3),
        _tiny.visual(rng, (3, 4, 4), kind="video", second_per_grid_t=1.0), _tiny.random_text(rng, 5)])


@partial(jax.jit, static_argnames=("graphdef",))
def _logits(graphdef, params, batch):
    model = nnx.merge(graphdef, params)
    h, _, _ = tg.forward(model, batch)
    return model.logits(h)


def our_logits(model, p):
    graphdef, params = nnx.split(model)
    return np.asarray(_logits(graphdef, params, prepare_prefill_batch([p], model.cfg)))[0, :len(p.input_ids)]


def hf_logits(hf, p):
    vids = [v for v in p.visuals if v.kind == "video"]
    imgs = [v for v in p.visuals if v.kind == "image"]
    with torch.no_grad():
        return hf(input_ids=torch.tensor(p.input_ids[None], dtype=torch.long),
                  mm_token_type_ids=torch.tensor(p.mm_token_type_ids[None], dtype=torch.long),
                  pixel_values=torch.tensor(np.concatenate([v.pixel_values for v in imgs])),
                  image_grid_thw=torch.tensor([v.grid_thw for v in imgs]),
                  pixel_values_videos=torch.tensor(np.concatenate([v.pixel_values for v in vids])),
                  video_grid_thw=torch.tensor([v.grid_thw for v in vids]),
                  second_per_grid_ts=torch.tensor([v.second_per_grid_t for v in vids])).logits[0].numpy()


def flat_params(model):
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_params(a, b):
    fa, fb = flat_params(a), flat_params(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype, k
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=str(k))


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


def rewrite_tensors(path, fn, name=SAFETENSORS):
    tensors = load_file(str(path / name))
    fn(tensors)
    save_file(tensors, str(path / name), metadata={"format": "pt"})


def edit_config(path, fn):
    d = json.loads((path / "config.json").read_text())
    fn(d)
    (path / "config.json").write_text(json.dumps(d))


# ------------------------------------------------------------------------------------ happy paths


def test_base_load_matches_hf(base, base_model, prompt):
    _, hf = base
    assert np.abs(our_logits(base_model, prompt) - hf_logits(hf, prompt)).max() <= 1e-4
    # the HF keys really are the on-disk layout
    keys = load_file(str(base[0] / SAFETENSORS)).keys()
    assert "model.layers.0.self_attn.q_proj.weight" in keys and "visual.patch_embed.proj.weight" in keys


def test_our_sharded_save_loads_identically(base_model, tmp_path):
    save_qwen2_5_vl(base_model, tmp_path, max_shard_bytes=60_000)
    index = json.loads((tmp_path / INDEX).read_text())
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) >= 3 and not (tmp_path / SAFETENSORS).exists()
    assert sorted(set(index["weight_map"].values())) == shards
    n_params = len(flat_params(base_model))
    assert len(index["weight_map"]) == n_params
    sizes = {s: sum(t.nbytes for t in load_file(str(tmp_path / s)).values()) for s in shards}
    assert index["metadata"]["total_size"] == sum(sizes.values())
    # every shard respects the limit unless it holds a single tensor larger than it
    for s, size in sizes.items():
        assert size <= 60_000 or len(load_file(str(tmp_path / s))) == 1, (s, size)
    assert_same_params(load_qwen2_5_vl(tmp_path), base_model)


def test_transformers_sharded_checkpoint_loads_identically(base, base_model, tmp_path):
    _, hf = base
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / INDEX).is_file() and len(list(tmp_path.glob("model-*.safetensors"))) >= 3
    assert_same_params(load_qwen2_5_vl(tmp_path), base_model)


def test_in_memory_key_layout_loads_identically(base, base_model, prompt, tmp_path):
    path, hf = base
    state = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
    assert any(k.startswith("model.language_model.") for k in state)
    assert any(k.startswith("model.visual.") for k in state)
    assert not any(k.startswith(("model.layers.", "visual.")) for k in state)
    save_file(state, str(tmp_path / SAFETENSORS), metadata={"format": "pt"})
    shutil.copy(path / "config.json", tmp_path / "config.json")
    m = load_qwen2_5_vl(tmp_path)
    assert_same_params(m, base_model)
    np.testing.assert_array_equal(our_logits(m, prompt), our_logits(base_model, prompt))


def test_transformers_in_memory_format_save_loads(base, base_model, tmp_path):
    """transformers' own `save_original_format=False` writes the in-memory names."""
    _, hf = base
    hf.save_pretrained(tmp_path, save_original_format=False)
    assert any(k.startswith("model.language_model.") for k in load_file(str(tmp_path / SAFETENSORS)))
    assert_same_params(load_qwen2_5_vl(tmp_path), base_model)


@pytest.mark.parametrize("shard_bytes", [None, 60_000], ids=["single", "sharded"])
def test_round_trip_through_transformers(base, base_model, prompt, tmp_path, shard_bytes):
    """HF save -> our load -> our save -> transformers from_pretrained == the original HF model."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    _, hf = base
    save_qwen2_5_vl(base_model, tmp_path, max_shard_bytes=shard_bytes)
    back = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ref, got = hf.state_dict(), back.state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    assert np.abs(hf_logits(back, prompt) - hf_logits(hf, prompt)).max() <= 1e-5
    # and our own load of our save is the identity
    assert_same_params(load_qwen2_5_vl(tmp_path), base_model)


def test_tied_embeddings_checkpoint(prompt, tmp_path):
    """tie_word_embeddings (as in Qwen2.5-VL-3B): no lm_head in the files; the head is the embedding."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf = _tiny.save_hf_checkpoint(tmp_path / "hf", _tiny.hf_config_dict(tie_word_embeddings=True), seed=12)
    assert "lm_head.weight" not in load_file(str(tmp_path / "hf" / SAFETENSORS))
    m = load_qwen2_5_vl(tmp_path / "hf")
    assert m.lm_head is None and m.cfg.tie_word_embeddings
    ref = hf_logits(hf, prompt)
    assert np.abs(our_logits(m, prompt) - ref).max() <= 1e-4
    save_qwen2_5_vl(m, tmp_path / "ours")
    back = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert back.config.tie_word_embeddings
    assert np.abs(hf_logits(back, prompt) - ref).max() <= 1e-5


def test_save_writes_a_readable_config(base_model, tmp_path):
    save_qwen2_5_vl(base_model, tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["model_type"] == "qwen2_5_vl" and d["text_config"]["rope_parameters"]["mrope_section"] == [2, 3, 3]
    assert d["dtype"] == "float32"
    assert load_qwen2_5_vl(tmp_path).cfg == base_model.cfg


# ------------------------------------------------------------------------------------------ errors


@pytest.fixture
def broken(base, tmp_path):
    """A fresh copy of the base checkpoint to damage."""
    return copy_ckpt(base[0], tmp_path / "ckpt")


@pytest.mark.parametrize("key", ["model.layers.1.mlp.up_proj.weight", "visual.merger.mlp.0.bias", "lm_head.weight"])
def test_missing_key(broken, key):
    rewrite_tensors(broken, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=f"missing weight key.*{key}"):
        load_qwen2_5_vl(broken)


def test_unexpected_key(broken):
    key = "model.layers.0.self_attn.extra_proj.weight"
    rewrite_tensors(broken, lambda t: t.__setitem__(key, np.zeros((4, 4), np.float32)))
    with pytest.raises(CheckpointError, match=f"unexpected weight key.*{key}"):
        load_qwen2_5_vl(broken)


def test_wrong_shape_tensor(broken):
    key = "model.layers.0.self_attn.q_proj.weight"  # config: hidden 64 -> [64, 64]
    rewrite_tensors(broken, lambda t: t.__setitem__(key, np.zeros((64, 48), np.float32)))
    with pytest.raises(CheckpointError, match=rf"{key} has shape \(64, 48\).*\(64, 64\)"):
        load_qwen2_5_vl(broken)


def test_config_disagrees_with_tensors(broken):
    edit_config(broken, lambda d: d["text_config"].__setitem__("intermediate_size", 96))
    with pytest.raises(CheckpointError, match=r"model\.layers\.\d+\.mlp\.\w+_proj\.weight has shape"):
        load_qwen2_5_vl(broken)


def test_no_safetensors_at_all(base, tmp_path):
    shutil.copy(base[0] / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_qwen2_5_vl(tmp_path)


def test_only_pytorch_bin(base, tmp_path):
    shutil.copy(base[0] / "config.json", tmp_path / "config.json")
    torch.save({"x": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"\.bin"):
        load_qwen2_5_vl(tmp_path)


def test_truncated_safetensors(broken):
    f = broken / SAFETENSORS
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=SAFETENSORS):
        load_qwen2_5_vl(broken)


def test_garbage_safetensors(broken):
    (broken / SAFETENSORS).write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match=SAFETENSORS):
        load_qwen2_5_vl(broken)


def test_truncated_shard(base_model, tmp_path):
    save_qwen2_5_vl(base_model, tmp_path, max_shard_bytes=60_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=shard.name):
        load_qwen2_5_vl(tmp_path)


def test_missing_shard(base_model, tmp_path):
    save_qwen2_5_vl(base_model, tmp_path, max_shard_bytes=60_000)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        load_qwen2_5_vl(tmp_path)


def test_missing_config(broken):
    (broken / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json"):
        load_qwen2_5_vl(broken)


def test_invalid_config_json(broken):
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        load_qwen2_5_vl(broken)


def test_mrope_section_not_half_head_dim(broken):
    edit_config(broken, lambda d: d["text_config"]["rope_parameters"].__setitem__("mrope_section", [2, 3, 4]))
    with pytest.raises(ConfigError, match=r"mrope_section \[2, 3, 4\].*head_dim/2 = 8"):
        load_qwen2_5_vl(broken)


def test_wrong_model_type(broken):
    edit_config(broken, lambda d: d.__setitem__("model_type", "qwen2_vl"))
    with pytest.raises(ConfigError, match="model_type 'qwen2_vl'"):
        load_qwen2_5_vl(broken)


def test_config_missing_field(broken):
    edit_config(broken, lambda d: d.pop("vision_config"))
    with pytest.raises(ConfigError, match="vision_config"):
        load_qwen2_5_vl(broken)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_qwen2_5_vl(tmp_path / "nope")

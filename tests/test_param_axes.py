"""Every parameter declares its logical axes where it is made, and every PartitionSpec comes from them.

Walks every parameter of both target families (tied and untied heads) and of the draft in every shape
it takes; checks the split the rules table asks for under a (data, fsdp, tensor) = (1, 2, 4) mesh (an
abstract mesh: only its axis sizes matter for the specs); and checks that parameters loaded from HF and
draft checkpoints keep their axes.
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

sys.path.insert(0, os.path.dirname(__file__))

import _tiny  # noqa: E402
from sparrow_jax.io.draft_checkpoint import load_draft, save_draft  # noqa: E402
from sparrow_jax.io.hf_checkpoint import (load_llava_onevision, load_qwen2_5_vl, save_llava_onevision,  # noqa: E402
                                          save_qwen2_5_vl)
from sparrow_jax.models import registry, views  # noqa: E402
from sparrow_jax.models.draft import DraftConfig, SparrowDraft  # noqa: E402
from sparrow_jax.models.layers import declared_axes  # noqa: E402
from sparrow_jax.training import sharding as shd  # noqa: E402

MESH = AbstractMesh((1, 2, 4), shd.MESH_AXES)


def _llava_dict(tied: bool):
    """Two tiny LLaVA-OneVision configs (one feature layer + own head; two feature layers + tied head)."""
    text = dict(model_type="qwen2", vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=tied)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=16, patch_size=4, vision_use_head=False)
    return dict(model_type="llava_onevision", text_config=text, vision_config=vision, image_token_index=290,
                video_token_index=291, vision_feature_layer=[-2, -1] if tied else -1, tie_word_embeddings=tied,
                vision_aspect_ratio="anyres_max_1", image_grid_pinpoints=[[16, 16], [16, 32], [32, 16]])


TARGET_CONFIGS = {
    "qwen2_5_vl": _tiny.hf_config_dict(),
    "qwen2_5_vl_tied": _tiny.hf_config_dict(tie_word_embeddings=True),
    "llava_onevision": _llava_dict(tied=False),
    "llava_onevision_tied": _llava_dict(tied=True),
}
QWEN = registry.config_from_dict(_tiny.hf_config_dict())
DRAFT_VARIANTS = {
    **{f"view_{v}": dict(visual_view=v) for v in views.VIEWS},
    "two_layers": dict(num_layers=2),
    "raw_embeddings_no_qkv_bias": dict(normalize_embeddings=False, qkv_bias=False),
}


def _abstract_target(name):
    cfg = registry.config_from_dict(TARGET_CONFIGS[name])
    return nnx.eval_shape(lambda: registry.build_target(cfg, rngs=nnx.Rngs(0)))


def _abstract_draft(name):
    cfg = DraftConfig.for_target(QWEN, **DRAFT_VARIANTS[name])
    return nnx.eval_shape(lambda: SparrowDraft(cfg, rngs=nnx.Rngs(0)))


def _params(model):
    return {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _axes(model):
    return {k: declared_axes(v) for k, v in _params(model).items()}


def _specs(model):
    specs = shd.state_specs(nnx.state(model, nnx.Param), MESH)
    return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(specs)}


MODELS = {**{f"target:{n}": (_abstract_target, n) for n in TARGET_CONFIGS},
          **{f"draft:{n}": (_abstract_draft, n) for n in DRAFT_VARIANTS}}


@pytest.mark.parametrize("which", list(MODELS))
def test_every_parameter_declares_its_axes(which):
    build, name = MODELS[which]
    params = _params(build(name))
    assert params
    missing = sorted(k for k, v in params.items() if declared_axes(v) is None)
    assert not missing, f"{which}: parameters without declared axes: {missing}"
    wrong = sorted(f"{k} {declared_axes(v)} for shape {v.shape}" for k, v in params.items()
                   if len(declared_axes(v)) != v.ndim)
    assert not wrong, f"{which}: axes that do not match the parameter's rank: {wrong}"
    unknown = sorted(f"{k} {a}" for k, v in params.items() for a in declared_axes(v) if a not in shd.RULES)
    assert not unknown, f"{which}: axes without a rule: {unknown}"


@pytest.mark.parametrize("which", list(MODELS))
def test_specs_follow_the_rules_and_no_matrix_is_replicated(which):
    """Each dimension goes to its axis' mesh axis (each mesh axis used once per parameter), and on this
    mesh, which divides every tiny width, every matrix is split somewhere."""
    build, name = MODELS[which]
    model = build(name)
    axes, specs = _axes(model), _specs(model)
    for k, spec in specs.items():
        used = set()
        for ax, got in zip(axes[k], tuple(spec) + (None,) * (len(axes[k]) - len(spec))):
            want = shd.RULES[ax]
            want = want if want not in used else None
            assert got == want, (k, axes[k], spec)
            used.add(want)
    replicated = sorted(k for k, v in _params(model).items() if v.ndim >= 2 and all(s is None for s in specs[k]))
    assert not replicated, f"{which}: matrices left replicated: {replicated}"


def test_llava_attention_output_and_projector_are_split_on_tensor():
    """The two the path-name guessing got wrong (it gave them ('norm', 'norm'): silently replicated)."""
    specs = _specs(_abstract_target("llava_onevision"))
    for i in range(2):
        assert specs[f"vision_tower.encoder.layers.{i}.self_attn.out_proj.kernel"] == P("tensor", "fsdp")
    assert specs["multi_modal_projector.linear_1.kernel"] == P("fsdp", "tensor")
    assert specs["multi_modal_projector.linear_1.bias"] == P("tensor")
    assert specs["multi_modal_projector.linear_2.kernel"] == P("tensor", "fsdp")


def test_undeclared_or_misdeclared_parameter_is_an_error_naming_it():
    class Bad(nnx.Module):
        def __init__(self, meta):
            self.w = nnx.Param(jnp.ones((4, 4)), **meta)

    with pytest.raises(ValueError, match=r"parameter w: no logical axes declared"):
        shd.state_specs(nnx.state(Bad({})), MESH)
    with pytest.raises(ValueError, match=r"parameter w: logical axes \('embed',\) for a 2-d parameter"):
        shd.state_specs(nnx.state(Bad({"out_sharding": ("embed",), "eager_sharding": False})), MESH)
    with pytest.raises(ValueError, match=r"parameter w: logical axes \['nope'\] have no entry"):
        shd.state_specs(nnx.state(Bad({"out_sharding": ("embed", "nope"), "eager_sharding": False})), MESH)


def _same_axes_and_values(loaded, original):
    la, oa = _axes(loaded), _axes(original)
    assert la == oa
    assert all(a is not None for a in la.values())
    lp, op = _params(loaded), _params(original)
    for k in op:
        np.testing.assert_array_equal(np.asarray(lp[k][...]), np.asarray(op[k][...]), err_msg=k)


@pytest.mark.parametrize("name", ["qwen2_5_vl", "llava_onevision_tied"])
def test_hf_checkpoint_loading_keeps_axes(name, tmp_path):
    cfg = registry.config_from_dict(TARGET_CONFIGS[name])
    model = registry.build_target(cfg, rngs=nnx.Rngs(3))
    if cfg.family == "llava_onevision":
        save_llava_onevision(model, tmp_path)
        loaded = load_llava_onevision(tmp_path)
    else:
        save_qwen2_5_vl(model, tmp_path)
        loaded = load_qwen2_5_vl(tmp_path)
    _same_axes_and_values(loaded, model)
    # and the placement the trainer does keeps them too
    mesh = shd.make_mesh((1, 1, 1), jax.devices()[:1])
    state = nnx.state(loaded, nnx.Param)
    placed = jax.device_put(state, shd.state_shardings(state, mesh))
    assert {".".join(map(str, p)): declared_axes(v) for p, v in nnx.to_flat_state(placed)} == _axes(model)


def test_draft_checkpoint_loading_keeps_axes(tmp_path):
    draft = SparrowDraft(DraftConfig.for_target(QWEN, num_layers=2), rngs=nnx.Rngs(5))
    save_draft(draft, tmp_path)
    _same_axes_and_values(load_draft(tmp_path, target_cfg=QWEN), draft)

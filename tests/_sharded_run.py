"""Run by tests/test_sharded_inference.py in a subprocess with 8 host devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8: the device count is fixed at process start).

For each family (Qwen2.5-VL, LLaVA-OneVision; tiny random targets with 8 heads / 4 KV heads), one
SpecDecoder decodes a 2-row batch (one video row, one text-only row) in AR and Sparrow mode on one device, then on the mesh
data=2,tensor=4; and the placed arrays' PartitionSpecs are read. Prints one JSON object."""

import json
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _tiny  # noqa: E402
from sparrow_jax import api  # noqa: E402
from sparrow_jax.decoding import engine as E  # noqa: E402
from sparrow_jax.decoding.tree import TreeSpec  # noqa: E402
from sparrow_jax.models import registry  # noqa: E402

MESH = "data=2,tensor=4"
QUESTIONS = ["What moves?", "Describe the colours of the scene."]
MAX_NEW = 8

QWEN = _tiny.hf_config_dict(text={"hidden_size": 128, "num_attention_heads": 8, "num_key_value_heads": 4},
                            vision={"out_hidden_size": 128})
LLAVA = dict(model_type="llava_onevision", image_token_index=290, video_token_index=291,
             vision_feature_select_strategy="full", vision_feature_layer=-1, vision_aspect_ratio="anyres_max_1",
             image_grid_pinpoints=[[28, 28]],
             text_config=dict(model_type="qwen2", vocab_size=300, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                              max_position_embeddings=4096, rope_theta=10000.0),
             vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=7,
                                vision_use_head=False))


def scaled_target(cfg, seed=0, scale=2.5):
    """A random target with wide greedy margins (as _tiny.random_model, for any family)."""
    model = registry.build_target(cfg, rngs=nnx.Rngs(seed))
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    nnx.update(model, nnx.from_flat_state(
        [(p, v.replace(v[...] * scale) if p[-1] in ("kernel", "embedding") else v) for p, v in flat]))
    return model


def spec_of(x):
    return [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]


def family(name, cfg_dict, d, video):
    cfg_path = d / f"{name}.json"
    cfg_path.write_text(json.dumps(cfg_dict))
    processor = api.Processor.from_config(cfg_path)
    target = scaled_target(processor.cfg)
    dec = api.SpecDecoder(processor, target, config=api.DecodeConfig(tree="chain3", max_new_tokens=MAX_NEW))
    vision = (api.VisionOptions(max_pixels=56 * 56) if processor.cfg.family == "qwen2_5_vl" else
              api.VisionOptions(num_frames=4))
    kw = dict(videos=[video, None], vision=vision)  # rows differ: a video row and a text-only row
    tokens = {}
    for mesh in (None, MESH):
        for mode in ("ar", "sparrow"):
            tokens[f"{mode}@{mesh or 'one device'}"] = [o.token_ids for o in dec.generate(QUESTIONS, mode=mode,
                                                                                         mesh=mesh, **kw)]
    # The arrays as placed on the mesh: parameters, and the caches the sharded prefills return.
    layer = target.model.layers[0]
    prompts = processor(QUESTIONS, kw["videos"], None, vision)
    ecfg = E.EngineConfig(tree=TreeSpec.parse("chain3"), max_new_tokens=MAX_NEW)
    p = E.prepare(target, dec.draft_for("sparrow"), prompts, ecfg, placement=dec.placement)
    draft_leaf = jax.tree.leaves(nnx.state(dec.draft_for("sparrow")))[0]
    return {
        "tokens": tokens,
        "q_proj": spec_of(layer.self_attn.q_proj.kernel[...]),
        "o_proj": spec_of(layer.self_attn.o_proj.kernel[...]),
        "mlp_up": spec_of(layer.mlp.up_proj.kernel[...]),
        "mlp_down": spec_of(layer.mlp.down_proj.kernel[...]),
        "target_k": [spec_of(k) for k in p.pre.cache.k],
        "target_v": [spec_of(v) for v in p.pre.cache.v],
        "target_k_shard_shape": list(p.pre.cache.k[0].addressable_shards[0].data.shape),
        "target_k_shape": list(p.pre.cache.k[0].shape),
        "draft_k": spec_of(p.dcache.k[0]),
        "draft_param": spec_of(draft_leaf),
        "rules_replicate": len(api.PL.rules_replicate(processor.cfg, api.PL.parse_mesh(MESH))),
    }


def main(out_dir):
    d = Path(out_dir)
    _, video = _tiny.write_cli_files(d)
    assert len(jax.devices()) == 8, jax.devices()
    res = {name: family(name, c, d, str(video)) for name, c in (("qwen2_5_vl", QWEN), ("llava_onevision", LLAVA))}
    print("RESULT " + json.dumps(res))


if __name__ == "__main__":
    main(sys.argv[1])

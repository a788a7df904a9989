"""Draft checkpoints: our format round trip, official Sparrow / EAGLE-2 import/export (keys, format detection,
refusals), parity of an imported hand-written checkpoint with a torch reference, parity with the official
modules themselves when their code is available (bench/official_drafts.py), and every refusal (fit, keys,
shapes, pickles, config)."""

from __future__ import annotations

import json
import os
import sys
import warnings
from functools import partial
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import _tiny
from sparrow_jax.io.draft_checkpoint import (CheckpointError, DraftFormatError, detect_format, draft_tensors,
                                             export_official, import_official, load_draft, save_draft)
from sparrow_jax.models.attention import MaskSpec
from sparrow_jax.models.draft import DraftConfig, DraftConfigError, SparrowDraft

TARGET = _tiny.our_config()  # hidden 64, vocab 300, 4 heads / 2 kv heads
EMB = np.random.default_rng(42).standard_normal((300, 64)).astype(np.float32)  # the target's embedding


def random_draft(seed=0, dtype=jnp.float32, **overrides) -> SparrowDraft:
    """A draft with every parameter random (norm weights too, so a swapped/dropped norm shows). Built
    abstractly and filled from numpy: no per-shape JAX init compiles."""
    cfg = DraftConfig.for_target(TARGET, **overrides)
    draft = nnx.eval_shape(lambda: SparrowDraft(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    rng = np.random.default_rng(seed)
    new = []
    for p, v in nnx.to_flat_state(nnx.state(draft, nnx.Param)):
        noise = rng.standard_normal(v.shape).astype(np.float32)
        w = 1.0 + 0.1 * noise if p[-1] == "weight" else 0.1 * noise  # norms ~1, linears/biases ~0.1
        new.append((p, v.replace(jnp.asarray(w, dtype))))
    nnx.update(draft, nnx.from_flat_state(new))
    return draft


@nnx.jit
def run(draft, e, h, pos, mask):
    return draft(e, h, pos, mask)


@nnx.jit
def run_hsr(draft, e, h):
    return draft.hsr_input(e, h)


def inputs(cfg: DraftConfig, B=2, T=7, seed=3):
    rng = np.random.default_rng(seed)
    e = jnp.asarray(rng.standard_normal((B, T, cfg.hidden_size)), jnp.float32)
    h = jnp.asarray(rng.standard_normal((B, T, cfg.hidden_size)), jnp.float32)
    pos = jnp.asarray(np.arange(T)[None] + np.array([[0], [4]])[:B], jnp.int32)
    mask = MaskSpec(kv_len_B=jnp.asarray([T, T - 2][:B], jnp.int32), causal=True)
    return e, h, pos, mask


def params(draft) -> dict[str, np.ndarray]:
    return draft_tensors(draft)


def assert_same_params(a, b):
    pa, pb = params(a), params(b)
    assert sorted(pa) == sorted(pb)
    for k in pa:
        assert pa[k].dtype == pb[k].dtype, k
        assert np.array_equal(pa[k], pb[k]), k


def assert_same_outputs(a, b):
    args = inputs(a.cfg)
    ya, kva = run(a, *args)
    yb, kvb = run(b, *args)
    assert np.array_equal(np.asarray(ya), np.asarray(yb))
    for (ka, va), (kb, vb) in zip(kva, kvb):
        assert np.array_equal(np.asarray(ka), np.asarray(kb)) and np.array_equal(np.asarray(va), np.asarray(vb))


def rewrite(d, fn):
    """Apply fn to the tensors of d/model.safetensors in place."""
    t = load_file(str(d / "model.safetensors"))
    fn(t)
    save_file(t, str(d / "model.safetensors"))


def export(draft, path, **kw):
    """export_official in the one format the draft fits, with an embedding of the draft's shape."""
    c = draft.cfg
    emb = EMB if (c.vocab_size, c.hidden_size) == EMB.shape else np.zeros((c.vocab_size, c.hidden_size), np.float32)
    fmt = "sparrow" if c.normalize_embeddings else "eagle2"
    export_official(draft, path, **{"format": fmt, "embed_tokens": emb, **kw})


def edit_config(d, **changes):
    c = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            c.pop(k, None)
        else:
            c[k] = v
    (d / "config.json").write_text(json.dumps(c))


# ------------------------------------------------------------------------------------------ round trips

@pytest.mark.parametrize("normalize,layers", [(True, 2), (False, 1)])
def test_save_load_roundtrip(tmp_path, normalize, layers):
    draft = random_draft(normalize_embeddings=normalize, num_layers=layers)
    save_draft(draft, tmp_path / "d")
    cfg_json = json.loads((tmp_path / "d" / "config.json").read_text())
    assert cfg_json["model_type"] == "sparrow_draft" and cfg_json["num_layers"] == layers
    names = set(load_file(str(tmp_path / "d" / "model.safetensors")))
    assert ("embed_norm.weight" in names) == normalize
    assert "layers.0.input_layernorm.weight" not in names
    assert ("layers.1.input_layernorm.weight" in names) == (layers > 1)
    assert load_file(str(tmp_path / "d" / "model.safetensors"))["fc.weight"].shape == (64, 128)  # torch [out, in]
    back = load_draft(tmp_path / "d", target_cfg=TARGET)
    assert back.cfg == draft.cfg
    assert_same_params(draft, back)
    assert_same_outputs(draft, back)


def test_save_load_bf16(tmp_path):
    draft = random_draft(dtype=jnp.bfloat16)
    save_draft(draft, tmp_path / "d")
    assert load_file(str(tmp_path / "d" / "model.safetensors"))["fc.weight"].dtype.name == "bfloat16"
    back = load_draft(tmp_path / "d", dtype=jnp.bfloat16)
    assert_same_params(draft, back)
    up = load_draft(tmp_path / "d")  # default fp32: exact upcast
    assert np.array_equal(params(up)["fc.weight"], params(draft)["fc.weight"].astype(np.float32))


@pytest.mark.parametrize("fmt", ["sparrow", "eagle2"])
@pytest.mark.parametrize("layers", [1, 2])
def test_official_export_import_roundtrip(tmp_path, fmt, layers):
    draft = random_draft(seed=layers, normalize_embeddings=fmt == "sparrow", num_layers=layers, rope_theta=5000.0)
    export_official(draft, tmp_path / "e", format=fmt, embed_tokens=EMB)
    hf = json.loads((tmp_path / "e" / "config.json").read_text())
    assert hf["num_hidden_layers"] == layers and hf["sparrow_jax_format"] == fmt
    assert hf["qkv_bias"] is True and hf["bias"] is True and hf["rope_theta"] == 5000.0
    t = load_file(str(tmp_path / "e" / "model.safetensors"))
    assert np.array_equal(t["embed_tokens.weight"], EMB)  # always written: Sparrow's loader reads it from here
    assert "embed_norm.weight" not in t
    assert ("input_layernorm.weight" in t) == (fmt == "sparrow")  # Sparrow's top-level name for RMSNorm(e_t)
    if fmt == "sparrow":
        assert np.array_equal(t["input_layernorm.weight"], params(draft)["embed_norm.weight"])
    assert detect_format(tmp_path / "e") == fmt
    back = import_official(tmp_path / "e", target_cfg=TARGET)
    assert back.cfg == draft.cfg
    assert_same_params(draft, back)
    assert_same_outputs(draft, back)


@pytest.mark.parametrize("fmt", ["sparrow", "eagle2"])
def test_export_refuses_unrepresentable_embedding_norm(tmp_path, fmt):
    """A normed draft has no EAGLE-2 form; an unnormed one has no Sparrow form. Refused with the reason;
    force=True writes it with a warning (norm dropped / all-ones norm added)."""
    draft = random_draft(normalize_embeddings=fmt == "eagle2")  # the wrong one for fmt
    reason = "without a norm" if fmt == "eagle2" else "always applies RMSNorm"
    with pytest.raises(DraftFormatError, match=reason):
        export_official(draft, tmp_path / "e", format=fmt, embed_tokens=EMB)
    assert not (tmp_path / "e").exists()
    with pytest.warns(UserWarning, match=reason):
        export_official(draft, tmp_path / "e", format=fmt, embed_tokens=EMB, force=True)
    back = import_official(tmp_path / "e", target_cfg=TARGET)
    assert back.cfg.normalize_embeddings == (fmt == "sparrow")


def test_export_needs_the_target_embedding(tmp_path):
    draft = random_draft()
    with pytest.raises(TypeError, match="embed_tokens"):
        export_official(draft, tmp_path / "e", format="sparrow")  # keyword-only and required
    with pytest.raises(ValueError, match="embed_tokens is required"):
        export_official(draft, tmp_path / "e", format="sparrow", embed_tokens=None)
    with pytest.raises(ValueError, match=r"embed_tokens has shape \(300, 32\)"):
        export_official(draft, tmp_path / "e", format="sparrow", embed_tokens=np.zeros((300, 32), np.float32))
    with pytest.raises(ValueError, match="format 'eagle'"):
        export_official(draft, tmp_path / "e", format="eagle", embed_tokens=EMB)


def test_official_import_prefixed_sharded_no_sparrow_keys(tmp_path):
    """`model.` prefixes, a sharded index, no sparrow_* config keys: the format comes from the key names."""
    draft = random_draft(num_layers=2)
    d = tmp_path / "e"
    export(draft, d)
    edit_config(d, sparrow_jax_format=None, sparrow_family=None, rope_parameters=None, head_dim=None)
    t = load_file(str(d / "model.safetensors"))
    t = {("model." + k if "layers" in k else k): v for k, v in t.items()}
    (d / "model.safetensors").unlink()
    names = sorted(t)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for f, ks in shards.items():
        save_file({k: t[k] for k in ks}, str(d / f))
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    assert detect_format(d) == "sparrow"
    back = import_official(d, target_cfg=TARGET)
    assert back.cfg == draft.cfg
    assert_same_params(draft, back)


def test_import_official_accepts_our_format(tmp_path):
    draft = random_draft()
    save_draft(draft, tmp_path / "d")
    assert detect_format(tmp_path / "d") == "ours"
    assert_same_params(draft, import_official(tmp_path / "d", target_cfg=TARGET))


def test_format_detection_errors_name_the_key_and_file(tmp_path):
    d = tmp_path / "marker"  # config says sparrow, weights have no input_layernorm.weight
    export(random_draft(normalize_embeddings=False), d)
    edit_config(d, sparrow_jax_format="sparrow")
    with pytest.raises(CheckpointError, match=r"config\.json: sparrow_jax_format is 'sparrow', but the weights are "
                                              r"the eagle2 layout \(the file has no top-level input_layernorm"):
        import_official(d, target_cfg=TARGET)
    with pytest.raises(CheckpointError, match="sparrow_jax_format"):
        detect_format(d)

    d = tmp_path / "ours_norm_name"  # our internal norm name in an official layout
    export(random_draft(), d)
    rewrite(d, lambda t: t.update({"embed_norm.weight": t.pop("input_layernorm.weight")}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: key embed_norm\.weight is sparrow-jax's internal "
                                              r"name; .* input_layernorm\.weight"):
        import_official(d, target_cfg=TARGET)


# ---------------------------------------------------------------------- hand-written EAGLE checkpoint

H, F, NH, NKV, V = 64, 128, 4, 2, 300


def eagle_state_dict(torch, norm_key=None, input_norm_ones=False, fc_bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.1, base=0.0):
        return (base + scale * torch.randn(*shape, generator=g)).contiguous()

    E = H // NH
    sd = {
        "embed_tokens.weight": r(V, H, scale=1.0),
        "fc.weight": r(H, 2 * H),
        "layers.0.self_attn.q_proj.weight": r(NH * E, H), "layers.0.self_attn.q_proj.bias": r(NH * E),
        "layers.0.self_attn.k_proj.weight": r(NKV * E, H), "layers.0.self_attn.k_proj.bias": r(NKV * E),
        "layers.0.self_attn.v_proj.weight": r(NKV * E, H), "layers.0.self_attn.v_proj.bias": r(NKV * E),
        "layers.0.self_attn.o_proj.weight": r(H, NH * E),
        "layers.0.mlp.gate_proj.weight": r(F, H), "layers.0.mlp.up_proj.weight": r(F, H),
        "layers.0.mlp.down_proj.weight": r(H, F),
        "layers.0.post_attention_layernorm.weight": r(H, base=1.0),
    }
    if fc_bias:
        sd["fc.bias"] = r(H)
    if norm_key:
        sd[norm_key] = r(H, base=1.0)
    if input_norm_ones:
        sd["layers.0.input_layernorm.weight"] = torch.ones(H)
    return sd


def eagle_config(**over):
    c = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": F,
         "num_attention_heads": NH, "num_key_value_heads": NKV, "num_hidden_layers": 1, "rms_norm_eps": 1e-6,
         "rope_theta": 5000.0, "vocab_size": V, "bias": True, "qkv_bias": True, "hidden_act": "silu",
         "max_position_embeddings": 2048, "torch_dtype": "float32"}
    c.update(over)
    return c


def write_eagle(d, sd, cfg, torch_save):
    d.mkdir(parents=True, exist_ok=True)
    torch_save(sd, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("norm_key,input_norm_ones,fc_bias", [
    (None, False, True), ("input_layernorm.weight", True, True), ("input_layernorm.weight", False, False)])
def test_import_handwritten_eagle_matches_torch(tmp_path, norm_key, input_norm_ones, fc_bias):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as torch_save  # noqa: PLC0415
    from transformers import Qwen2Config  # noqa: PLC0415
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding  # noqa: PLC0415

    sd = eagle_state_dict(torch, norm_key, input_norm_ones, fc_bias)
    d = write_eagle(tmp_path / "e", sd, eagle_config(bias=fc_bias), torch_save)
    draft = import_official(d, target_cfg=TARGET)
    assert draft.cfg.normalize_embeddings == (norm_key is not None)
    assert draft.cfg.rope_theta == 5000.0 and draft.cfg.vocab_size == V and draft.cfg.num_layers == 1

    # torch reference: z = fc(cat(norm?(emb), h)); Qwen2 decoder layer without input norm
    B, T = 2, 6
    rng = np.random.default_rng(0)
    ids = torch.as_tensor(rng.integers(0, V, (B, T)))
    hprev = torch.as_tensor(rng.standard_normal((B, T, H)), dtype=torch.float32)
    pos = torch.arange(T)[None].repeat(B, 1) + torch.tensor([[0], [3]])
    emb = sd["embed_tokens.weight"][ids]
    e_in = emb
    if norm_key:
        e_in = sd[norm_key] * (emb * torch.rsqrt(emb.pow(2).mean(-1, keepdim=True) + 1e-6))
    z_ref = torch.nn.functional.linear(torch.cat([e_in, hprev], -1), sd["fc.weight"], sd.get("fc.bias"))
    qcfg = Qwen2Config(hidden_size=H, intermediate_size=F, num_attention_heads=NH, num_key_value_heads=NKV,
                       num_hidden_layers=1, rms_norm_eps=1e-6, vocab_size=V, hidden_act="silu",
                       rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    qcfg._attn_implementation = "eager"
    layer = Qwen2DecoderLayer(qcfg, layer_idx=0).eval()
    layer.input_layernorm = torch.nn.Identity()
    layer.load_state_dict({k[len("layers.0."):]: v for k, v in sd.items()
                           if k.startswith("layers.0.") and "input_layernorm" not in k}, strict=True)
    cos, sin = Qwen2RotaryEmbedding(qcfg)(z_ref, pos)
    causal = torch.full((T, T), torch.finfo(torch.float32).min).triu(1)[None, None].repeat(B, 1, 1, 1)
    with torch.no_grad():
        y_ref = layer(z_ref, attention_mask=causal, position_ids=pos, position_embeddings=(cos, sin))

    e = jnp.asarray(emb.numpy())  # the target's embedding (shared) feeds the draft
    h = jnp.asarray(hprev.numpy())
    z = run_hsr(draft, e, h)
    np.testing.assert_allclose(np.asarray(z), z_ref.numpy(), atol=1e-5, rtol=0)
    y, _ = run(draft, e, h, pos.numpy().astype(np.int32), MaskSpec(kv_len_B=np.full((B,), T, np.int32), causal=True))
    np.testing.assert_allclose(np.asarray(y), y_ref.numpy(), atol=1e-5, rtol=0)


def test_import_warns_on_foreign_embedding(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as torch_save  # noqa: PLC0415

    sd = eagle_state_dict(torch)
    d = write_eagle(tmp_path / "e", sd, eagle_config(), torch_save)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        import_official(d, target_cfg=TARGET, target_embedding=sd["embed_tokens.weight"].numpy())
    with pytest.warns(UserWarning, match="differs from the target's embedding"):
        import_official(d, target_cfg=TARGET, target_embedding=np.zeros((V, H), np.float32))


# ------------------------------------------------------------------------------------------------ errors

def test_hidden_size_mismatch_is_refused(tmp_path):
    small = random_draft(hidden_size=32, intermediate_size=64)
    export(small, tmp_path / "e")
    with pytest.raises(DraftConfigError, match=r"hidden size 32 != target 64"):
        import_official(tmp_path / "e", target_cfg=TARGET)
    save_draft(small, tmp_path / "d")
    with pytest.raises(DraftConfigError, match=r"hidden size 32 != target 64"):
        load_draft(tmp_path / "d", target_cfg=TARGET)
    load_draft(tmp_path / "d")  # without a target it loads


def test_vocab_mismatch_is_refused(tmp_path):
    other = random_draft(vocab_size=301)
    save_draft(other, tmp_path / "d")
    with pytest.raises(DraftConfigError, match=r"vocab 301 != target 300"):
        load_draft(tmp_path / "d", target_cfg=TARGET)
    export(other, tmp_path / "e")
    with pytest.raises(DraftConfigError, match=r"vocab 301 != target 300"):
        import_official(tmp_path / "e", target_cfg=TARGET)
    # no vocab_size in config, but an embedding of another vocabulary
    export(random_draft(), tmp_path / "e2")
    rewrite(tmp_path / "e2", lambda t: t.update({"embed_tokens.weight": np.zeros((301, 64), np.float32)}))
    edit_config(tmp_path / "e2", vocab_size=None)
    with pytest.raises(CheckpointError, match=r"embed_tokens\.weight has shape \(301, 64\).*\(300, 64\)"):
        import_official(tmp_path / "e2", target_cfg=TARGET)


@pytest.mark.parametrize("fmt", ["ours", "sparrow", "eagle2"])
def test_missing_unexpected_misshaped_keys(tmp_path, fmt):
    draft = random_draft(num_layers=2, normalize_embeddings=fmt != "eagle2")
    write, read = (save_draft, load_draft) if fmt == "ours" else (export, import_official)
    kw = {"target_cfg": TARGET}

    d = tmp_path / "missing"
    write(draft, d)
    rewrite(d, lambda t: t.pop("layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing weight key.*layers\.1\.mlp\.up_proj\.weight") as ei:
        read(d, **kw)
    assert str(d) in str(ei.value)

    d = tmp_path / "unexpected"
    write(draft, d)
    rewrite(d, lambda t: t.update({"layers.0.mlp.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError,
                       match=r"unexpected weight key.*layers\.0\.mlp\.extra\.weight.*model\.safetensors"):
        read(d, **kw)

    d = tmp_path / "shape"
    write(draft, d)
    rewrite(d, lambda t: t.update({"layers.0.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: weight layers\.0\.self_attn\.k_proj\.weight has "
                                              r"shape \(64, 64\), config\.json implies \(32, 64\)"):
        read(d, **kw)

    d = tmp_path / "transposed"  # a JAX-layout [in, out] kernel written by mistake
    write(draft, d)
    rewrite(d, lambda t: t.update({"fc.weight": np.ascontiguousarray(t["fc.weight"].T)}))
    with pytest.raises(CheckpointError, match=r"fc\.weight has shape \(128, 64\), config\.json implies \(64, 128\)"):
        read(d, **kw)


@pytest.mark.parametrize("reader", ["ours", "official"])
def test_only_pickle_weights_are_refused_unopened(tmp_path, reader):
    d = tmp_path / "p"
    d.mkdir()
    cfg = DraftConfig.for_target(TARGET).to_dict() if reader == "ours" else eagle_config()
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")  # opening it would fail differently
    fn = load_draft if reader == "ours" else partial(import_official, target_cfg=TARGET)
    with pytest.raises(CheckpointError, match=r"only pickle weights found \(pytorch_model\.bin\).*safetensors"):
        fn(d)


def test_missing_config_and_not_a_directory(tmp_path):
    draft = random_draft()
    save_draft(draft, tmp_path / "d")
    (tmp_path / "d" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: not found"):
        load_draft(tmp_path / "d")
    with pytest.raises(CheckpointError, match=r"config\.json: not found"):
        import_official(tmp_path / "d", target_cfg=TARGET)
    with pytest.raises(CheckpointError, match="not a directory"):
        load_draft(tmp_path / "nope")


def test_wrong_loader_and_unsupported_variants(tmp_path):
    draft = random_draft()
    export(draft, tmp_path / "e")
    with pytest.raises(CheckpointError, match="use import_official"):
        load_draft(tmp_path / "e")

    d = tmp_path / "in0"  # a trained first-layer input norm: different architecture
    export(draft, d)
    rewrite(d, lambda t: t.update({"layers.0.input_layernorm.weight": np.full(64, 1.5, np.float32)}))
    with pytest.raises(CheckpointError, match=r"layers\.0\.input_layernorm\.weight is present and not all ones"):
        import_official(d, target_cfg=TARGET)

    d = tmp_path / "eagle3"
    export(draft, d)
    rewrite(d, lambda t: t.update({"d2t": np.zeros(3, np.int64)}))
    with pytest.raises(CheckpointError, match="EAGLE-3"):
        import_official(d, target_cfg=TARGET)

    d = tmp_path / "no_qkv_bias_key"  # their code would build q/k/v without bias and drop these
    export(draft, d)
    edit_config(d, qkv_bias=None)
    with pytest.warns(UserWarning, match="no qkv_bias key but the weights have q/k/v biases"):
        assert import_official(d, target_cfg=TARGET).cfg.qkv_bias

    d = tmp_path / "rope"
    export(draft, d)
    edit_config(d, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0})
    with pytest.raises(DraftConfigError, match="RoPE type 'llama3'"):
        import_official(d, target_cfg=TARGET)

    d = tmp_path / "heads"
    save_draft(draft, d)
    c = json.loads((d / "config.json").read_text())
    c["num_attention_heads"] = 5
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(DraftConfigError, match="not divisible by num_attention_heads 5"):
        load_draft(d)


# ---------------------------------------------------------------------------- the official modules themselves

@pytest.mark.parametrize("fmt,var", [("sparrow", "SPARROW_OFFICIAL_CODE"), ("eagle2", "EAGLE_OFFICIAL_CODE")])
def test_official_modules_match_our_import_and_export(tmp_path, fmt, var):
    """bench/official_drafts.py's check against the official draft module itself (Sparrow's cnets_sparrow.py,
    EAGLE-2's cnets1.py), when `var` points at a checkout: official file -> import_official, and
    export_official -> their loader (every key consumed); outputs on identical inputs within REL_TOL."""
    if not os.environ.get(var):
        pytest.skip(f"{var} is not set (path to a checkout of the official {fmt} code)")
    pytest.importorskip("torch")
    bench = Path(__file__).resolve().parents[1] / "bench"
    sys.path.insert(0, str(bench))
    import official_drafts  # noqa: PLC0415

    records = official_drafts.check(fmt, layers=2, work=tmp_path, target_cfg=TARGET)
    assert {r["direction"] for r in records} == {"official->ours", "ours->official"}
    for r in records:
        assert r["ok"], r

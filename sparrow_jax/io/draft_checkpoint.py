"""Draft checkpoints: our own format, and import/export of the EAGLE layout (safetensors only).

Two on-disk formats share one tensor naming (torch layout: a Linear weight is [out, in]):

    embed_norm.weight                                  (only when normalize_embeddings)
    fc.weight [D, 2D], fc.bias [D]                     (input is concat([e_t, h_{t-1}]))
    layers.{i}.self_attn.{q,k,v}_proj.{weight,bias}    (bias only with qkv_bias)
    layers.{i}.self_attn.o_proj.weight
    layers.{i}.mlp.{gate,up,down}_proj.weight
    layers.{i}.input_layernorm.weight                  (only i > 0: the first layer has none)
    layers.{i}.post_attention_layernorm.weight

* Our format (`save_draft` / `load_draft`): `config.json` = `DraftConfig.to_dict()` (model_type
  "sparrow_draft") + `model.safetensors`. Strict: every missing, unexpected or misshaped key is an error.
* EAGLE format (`import_eagle` / `export_eagle`): the layout EAGLE-1/2 and the Sparrow/ViSpec releases
  built on its code use: a Llama/Qwen2-like `config.json` + `model.safetensors` (or a sharded set with
  `model.safetensors.index.json`). In EAGLE's code the config key `bias` is the bias of `fc` (default
  true) and `qkv_bias` the q/k/v bias; we follow that (see `_eagle_config`). EAGLE-3 drafts (`midlayer.*`,
  `d2t`/`t2d`, a 3D-wide fc) are a different architecture and are refused.

Pickle files (*.bin, *.pt, *.pth) are never opened: convert them to safetensors first.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from sparrow_jax.io.hf_checkpoint import CheckpointError
from sparrow_jax.models.draft import DraftConfig, DraftConfigError, SparrowDraft
from sparrow_jax.models.layers import ACTIVATIONS

__all__ = ["save_draft", "load_draft", "import_eagle", "export_eagle", "draft_tensors",
           "EMBED_NORM_ALIASES", "CheckpointError", "DraftConfigError"]

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
# Names Sparrow-style drafts may give the RMSNorm on e_t (official names unverified); first is ours.
EMBED_NORM_ALIASES = ("embed_norm.weight", "enorm.weight", "norm_embed.weight", "embed_layernorm.weight",
                      "input_norm.weight")
_PICKLE_GLOBS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
_CONVERT_HINT = (
    "sparrow-jax reads safetensors only and never unpickles. Convert the weights once, in an environment you "
    "trust, with torch + `safetensors.torch.save_file` (or transformers' `save_pretrained`), and point "
    "sparrow-jax at the resulting model.safetensors")


# ----------------------------------------------------------------------------------------------- names

def _name(path) -> str:
    """NNX flat-state path -> torch-style name ('fc', 'kernel') -> 'fc.weight'."""
    name = ".".join(str(p) for p in path)
    return name[: -len(".kernel")] + ".weight" if name.endswith(".kernel") else name


def _is_kernel(path) -> bool:
    return path[-1] == "kernel"


def draft_tensors(draft: SparrowDraft) -> dict[str, np.ndarray]:
    """All draft parameters as numpy arrays under their torch names, in torch layout ([out, in])."""
    out = {}
    for p, v in nnx.to_flat_state(nnx.state(draft, nnx.Param)):
        w = np.asarray(v[...])
        out[_name(p)] = np.ascontiguousarray(w.T if _is_kernel(p) else w)
    return out


# ------------------------------------------------------------------------------------------- reading

def _check_dir(d: Path) -> None:
    if not d.is_dir():
        raise CheckpointError(f"{d}: not a directory (expected a draft checkpoint directory)")


def _read_config(d: Path) -> dict:
    p = d / "config.json"
    if not p.is_file():
        raise CheckpointError(f"{p}: not found (a draft checkpoint directory needs config.json next to "
                              f"its safetensors)")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p}: invalid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{p}: expected a JSON object")
    return cfg


def _weight_files(d: Path) -> dict[str, Path]:
    """tensor name -> file, from a single model.safetensors or a sharded index."""
    index = d / INDEX
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: unreadable index ({type(e).__name__}: {e})") from None
        for f in sorted(set(wm.values())):
            if not (d / f).is_file():
                raise CheckpointError(f"{index}: shard {f} is missing")
        return {k: d / f for k, f in wm.items()}
    single = d / WEIGHTS
    if not single.is_file():
        others = sorted(d.glob("*.safetensors"))
        if len(others) == 1:  # e.g. a release that names its only file differently
            single = others[0]
        elif others:
            raise CheckpointError(f"{d}: several *.safetensors files ({[o.name for o in others]}) but no {INDEX}")
        else:
            pickles = sorted({p.name for g in _PICKLE_GLOBS for p in d.glob(g)})
            if pickles:
                raise CheckpointError(f"{d}: only pickle weights found ({', '.join(pickles)}). {_CONVERT_HINT}")
            raise CheckpointError(f"{d}: no {WEIGHTS} or {INDEX}")
    try:
        with safe_open(str(single), "np") as f:
            return {k: single for k in f.keys()}
    except Exception as e:  # safetensors raises several types for truncated/corrupt files
        raise CheckpointError(f"{single}: cannot read safetensors ({type(e).__name__}: {e})") from None


def _read_tensors(d: Path) -> dict[str, tuple[np.ndarray, Path]]:
    """name -> (array, file it came from). bf16 stays bf16 (ml_dtypes)."""
    files = _weight_files(d)
    by_file: dict[Path, list[str]] = {}
    for k, f in files.items():
        by_file.setdefault(f, []).append(k)
    out = {}
    for f, keys in by_file.items():
        try:
            with safe_open(str(f), "np") as fh:
                present = set(fh.keys())
                for k in keys:
                    if k not in present:
                        raise CheckpointError(f"{f}: tensor {k} listed in {INDEX} is not in the file")
                    out[k] = (np.asarray(fh.get_tensor(k)), f)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{f}: cannot read safetensors ({type(e).__name__}: {e})") from None
    return out


def _list(keys, n=5) -> str:
    keys = sorted(keys)
    return f"{keys[:n]}{' ...' if len(keys) > n else ''}"


# ---------------------------------------------------------------------------------------- validation

def _validate(cfg: DraftConfig, source: str) -> None:
    """Structural checks DraftConfig itself does not make (so errors come before shapes go wrong)."""
    problems = []
    if cfg.num_layers < 1:
        problems.append(f"num_layers {cfg.num_layers} < 1")
    if cfg.num_attention_heads < 1 or cfg.hidden_size % cfg.num_attention_heads:
        problems.append(f"hidden_size {cfg.hidden_size} is not divisible by num_attention_heads "
                        f"{cfg.num_attention_heads}")
    elif cfg.head_dim % 2:
        problems.append(f"head_dim {cfg.head_dim} is odd (RoPE needs an even head_dim)")
    if cfg.num_key_value_heads < 1 or cfg.num_attention_heads % cfg.num_key_value_heads:
        problems.append(f"num_attention_heads {cfg.num_attention_heads} is not a multiple of "
                        f"num_key_value_heads {cfg.num_key_value_heads}")
    if cfg.hidden_act not in ACTIVATIONS:
        problems.append(f"hidden_act {cfg.hidden_act!r} unsupported (known: {sorted(ACTIVATIONS)})")
    if problems:
        raise DraftConfigError(f"{source}: " + "; ".join(problems))


def _fill(cfg: DraftConfig, tensors: dict[str, tuple[np.ndarray, Path]], d: Path, dtype) -> SparrowDraft:
    """Build the draft abstractly and fill every parameter from `tensors` (torch names and layout)."""
    model = nnx.eval_shape(lambda: SparrowDraft(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    wanted = {_name(p): (p, v) for p, v in flat}
    missing = set(wanted) - set(tensors)
    unexpected = set(tensors) - set(wanted)
    if missing:
        raise CheckpointError(f"{d}: missing weight key(s) {_list(missing)} (config.json describes a draft with "
                              f"{cfg.num_layers} layer(s), normalize_embeddings={cfg.normalize_embeddings}, "
                              f"qkv_bias={cfg.qkv_bias})")
    if unexpected:
        files = sorted({tensors[k][1].name for k in unexpected})
        raise CheckpointError(f"{d}: unexpected weight key(s) {_list(unexpected)} in {files} (not part of a draft "
                              f"with {cfg.num_layers} layer(s), normalize_embeddings={cfg.normalize_embeddings}, "
                              f"qkv_bias={cfg.qkv_bias})")
    values = []
    for name, (p, v) in wanted.items():
        w, f = tensors[name]
        expect = tuple(v.shape[::-1]) if _is_kernel(p) else tuple(v.shape)
        if tuple(w.shape) != expect:
            raise CheckpointError(f"{f}: weight {name} has shape {tuple(w.shape)}, config.json implies {expect}")
        if not (np.issubdtype(w.dtype, np.floating) or w.dtype.name == "bfloat16"):
            raise CheckpointError(f"{f}: weight {name} has non-float dtype {w.dtype}")
        values.append((p, v.replace(jnp.asarray(w.T if _is_kernel(p) else w, dtype=dtype))))
    nnx.update(model, nnx.from_flat_state(values))
    return model


def _write_weights(d: Path, tensors: dict[str, np.ndarray]) -> None:
    save_file(tensors, str(d / WEIGHTS), metadata={"format": "pt"})


def _dtype_name(tensors: dict[str, np.ndarray]) -> str:
    return str(next(iter(tensors.values())).dtype)


# ---------------------------------------------------------------------------------------- our format

def save_draft(draft: SparrowDraft, path) -> None:
    """Write `config.json` (DraftConfig.to_dict()) + `model.safetensors` (torch layout, param dtype)."""
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    tensors = draft_tensors(draft)
    cfg_d = draft.cfg.to_dict()
    cfg_d["dtype"] = _dtype_name(tensors)  # informational; from_dict ignores it
    (d / "config.json").write_text(json.dumps(cfg_d, indent=2))
    _write_weights(d, tensors)


def load_draft(path, *, dtype=jnp.float32, target_cfg=None) -> SparrowDraft:
    """Read a directory written by `save_draft`. dtype: parameter dtype of the returned draft.
    With `target_cfg`, a draft whose hidden size / vocab / family does not fit it is refused
    (DraftConfigError) before any weight is read."""
    d = Path(path)
    _check_dir(d)
    raw = _read_config(d)
    src = str(d / "config.json")
    if raw.get("model_type") != "sparrow_draft":
        raise CheckpointError(f"{src}: model_type {raw.get('model_type')!r} is not 'sparrow_draft'; for EAGLE/"
                              "Sparrow-release layouts (Llama/Qwen2-style config.json) use import_eagle(path, "
                              "target_cfg=...)")
    cfg = DraftConfig.from_dict(raw, source=src)
    _validate(cfg, src)
    if target_cfg is not None:
        cfg.check_fits(target_cfg, source=str(d))
    return _fill(cfg, _read_tensors(d), d, dtype)


# -------------------------------------------------------------------------------------- EAGLE layout

def _strip_prefix(tensors: dict, d: Path) -> dict:
    out = {}
    for k, v in tensors.items():
        k2 = k[len("model."):] if k.startswith("model.") else k
        if k2 in out:
            raise CheckpointError(f"{d}: weight {k2} appears both with and without the 'model.' prefix")
        out[k2] = v
    return out


def _eagle_config(raw: dict, tensors: dict, target_cfg, src: str) -> tuple[DraftConfig, bool]:
    """Llama/Qwen2-like EAGLE config.json -> (DraftConfig, fc_has_bias)."""
    missing = [k for k in ("hidden_size", "intermediate_size", "num_attention_heads") if k not in raw]
    if missing:
        raise DraftConfigError(f"{src}: missing field(s) {missing}")
    H, nh = int(raw["hidden_size"]), int(raw["num_attention_heads"])
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise DraftConfigError(f"{src}: rope_parameters/rope_scaling must be an object, got {rope!r}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in (None, "default"):
        raise DraftConfigError(f"{src}: RoPE type {rope_type!r} is not supported (only plain/default RoPE)")
    theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))  # HF Llama/Qwen2 default
    head_dim = raw.get("head_dim")
    if head_dim is not None and int(head_dim) * nh != H:
        raise DraftConfigError(f"{src}: head_dim {head_dim} x num_attention_heads {nh} != hidden_size {H}; "
                               "drafts with a decoupled head_dim are not supported")
    layers = raw.get("num_hidden_layers", 1)
    if "qkv_bias" in raw:  # EAGLE's own key for the q/k/v bias
        qkv_bias = bool(raw["qkv_bias"])
    else:  # Llama configs have none and no bias; Qwen2 configs imply it: trust the tensors
        qkv_bias = "layers.0.self_attn.q_proj.bias" in tensors
    norm_keys = [k for k in EMBED_NORM_ALIASES if k in tensors]
    if len(norm_keys) > 1:
        raise CheckpointError(f"{src}: several embedding-norm weights {norm_keys}; expected at most one")
    normalize = bool(raw.get("sparrow_normalize_embeddings", bool(norm_keys)))
    vocab = raw.get("vocab_size", target_cfg.text.vocab_size)
    try:
        cfg = DraftConfig(
            hidden_size=H, intermediate_size=int(raw["intermediate_size"]), num_attention_heads=nh,
            num_key_value_heads=int(raw.get("num_key_value_heads") or nh), vocab_size=int(vocab),
            num_layers=int(layers), rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
            hidden_act=raw.get("hidden_act", "silu"), qkv_bias=qkv_bias, normalize_embeddings=normalize,
            family="qwen2")  # EAGLE's Llama layer == the Qwen2 layer up to the q/k/v bias, decided above
    except (TypeError, ValueError) as e:
        raise DraftConfigError(f"{src}: {e}") from None
    return cfg, bool(raw.get("bias", True))  # EAGLE: `bias` is the fc bias, default true


def import_eagle(path, *, target_cfg, dtype=jnp.float32, target_embedding=None) -> SparrowDraft:
    """Read an EAGLE-1/2-layout draft (also the layout of Sparrow/ViSpec releases) for `target_cfg`.

    * Key prefix `model.` is stripped.
    * `embed_tokens.weight` / `lm_head.weight`, when present, must have the target's [vocab, hidden] shape;
      their values are NOT used: the draft shares the target's embedding and head (the engine passes
      embeddings in and applies the target's head). Pass `target_embedding` ([V, D] array) to get a
      warning when the stored embedding differs from the target's (a draft trained for another model).
    * The embedding RMSNorm may be stored under any of EMBED_NORM_ALIASES; without one the draft feeds e_t
      raw into fc (EAGLE-1 behaviour, normalize_embeddings=False). `sparrow_normalize_embeddings` in
      config.json, when present, makes the choice explicit (and a missing/extra norm weight an error).
    * `layers.0.input_layernorm.weight` is accepted only if all ones: EAGLE's first layer applies no input
      norm, so an all-ones weight is an untrained leftover of a converter that built a standard layer;
      any other value means the layer used it, which this architecture cannot represent.
    * `bias: false` (EAGLE's fc without bias) loads as a zero fc bias.
    * The draft's vocab is the target's; a config `vocab_size` that differs is refused (check_fits).
    """
    d = Path(path)
    _check_dir(d)
    raw = _read_config(d)
    src = str(d / "config.json")
    if raw.get("model_type") == "sparrow_draft":  # our own format: same tensors, exact config
        return load_draft(d, dtype=dtype, target_cfg=target_cfg)
    tensors = _strip_prefix(_read_tensors(d), d)
    eagle3 = sorted(k for k in tensors if k.startswith("midlayer.") or k in ("d2t", "t2d"))
    if eagle3:
        raise CheckpointError(f"{d}: looks like an EAGLE-3 draft (keys {_list(eagle3)}); EAGLE-3 (fused "
                              "multi-layer features, own vocab mapping) is not supported, only the EAGLE-1/2 / "
                              "Sparrow layout")
    cfg, fc_bias = _eagle_config(raw, tensors, target_cfg, src)
    _validate(cfg, src)
    cfg.check_fits(target_cfg, source=str(d))
    t = target_cfg.text

    for name in ("embed_tokens.weight", "lm_head.weight"):
        if name in tensors:
            w, f = tensors.pop(name)
            if tuple(w.shape) != (t.vocab_size, t.hidden_size):
                raise CheckpointError(f"{f}: weight {name} has shape {tuple(w.shape)}, the target's is "
                                      f"{(t.vocab_size, t.hidden_size)} (a draft made for another model?)")
            if name == "embed_tokens.weight" and target_embedding is not None:
                ref = np.asarray(jnp.asarray(target_embedding, jnp.float32))
                diff = float(np.max(np.abs(np.asarray(w, np.float32) - ref))) if ref.shape == w.shape else np.inf
                if not diff <= 1e-2 * max(1.0, float(np.max(np.abs(ref)))):
                    warnings.warn(f"{f}: embed_tokens.weight differs from the target's embedding (max |diff| "
                                  f"{diff:.3g}); the draft may have been trained for another model. The target's "
                                  "embedding is used.", stacklevel=2)

    norm_keys = [k for k in EMBED_NORM_ALIASES if k in tensors]
    if cfg.normalize_embeddings and norm_keys:
        tensors["embed_norm.weight"] = tensors.pop(norm_keys[0])
    elif not cfg.normalize_embeddings and norm_keys:
        raise CheckpointError(f"{d}: unexpected weight key {norm_keys[0]} (config.json sets "
                              "sparrow_normalize_embeddings=false)")

    if "layers.0.input_layernorm.weight" in tensors:
        w, f = tensors.pop("layers.0.input_layernorm.weight")
        if not np.all(np.asarray(w, np.float32) == 1.0):
            raise CheckpointError(
                f"{f}: layers.0.input_layernorm.weight is present and not all ones. EAGLE/Sparrow drafts apply "
                "no input norm in their first layer (fc's output goes straight into attention), so this "
                "weight was trained and used: the checkpoint is a different architecture, and loading it "
                "without that norm would silently change the draft's outputs. (An all-ones weight is accepted "
                "and dropped as an untrained leftover.)")

    if not fc_bias:
        if "fc.bias" in tensors:
            raise CheckpointError(f"{tensors['fc.bias'][1]}: unexpected weight key fc.bias "
                                  "(config.json sets bias=false, EAGLE's switch for the fc bias)")
        tensors["fc.bias"] = (np.zeros((cfg.hidden_size,), np.float32), d / "config.json")
    return _fill(cfg, tensors, d, dtype)


def export_eagle(draft: SparrowDraft, path, *, embed_tokens=None) -> None:
    """Write the EAGLE layout: a Qwen2Config-like config.json (+ EAGLE's `bias` = fc bias, `qkv_bias`,
    `sparrow_normalize_embeddings`) and model.safetensors with EAGLE names (embedding norm, when used, as
    `embed_norm.weight`). `embed_tokens` ([V, D], the target's embedding) is optional: EAGLE code loads
    it from the base model, but some loaders expect it in the draft file."""
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    cfg = draft.cfg
    tensors = draft_tensors(draft)
    dt = _dtype_name(tensors)
    if embed_tokens is not None:
        e = np.ascontiguousarray(np.asarray(embed_tokens))
        if e.shape != (cfg.vocab_size, cfg.hidden_size):
            raise ValueError(f"embed_tokens has shape {e.shape}, expected {(cfg.vocab_size, cfg.hidden_size)}")
        tensors["embed_tokens.weight"] = e
    hf = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "num_hidden_layers": cfg.num_layers,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "vocab_size": cfg.vocab_size,
        "hidden_act": cfg.hidden_act,
        "bias": True,  # EAGLE: fc bias (ours always has one)
        "qkv_bias": cfg.qkv_bias,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": dt,
        "sparrow_normalize_embeddings": cfg.normalize_embeddings,
        "sparrow_family": cfg.family,
    }
    (d / "config.json").write_text(json.dumps(hf, indent=2))
    _write_weights(d, tensors)

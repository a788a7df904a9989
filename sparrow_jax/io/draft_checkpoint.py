"""Draft checkpoints: our own format, and the official EAGLE-2 / Sparrow layouts (safetensors only).

All formats use torch tensor names and layout (a Linear weight is [out, in]):

    embed_norm.weight                                  (ours; only when normalize_embeddings)
    fc.weight [D, 2D], fc.bias [D]                     (input is concat([e_t, h_{t-1}]))
    layers.{i}.self_attn.{q,k,v}_proj.{weight,bias}    (bias only with qkv_bias)
    layers.{i}.self_attn.o_proj.weight
    layers.{i}.mlp.{gate,up,down}_proj.weight
    layers.{i}.input_layernorm.weight                  (only i > 0: the first layer has none)
    layers.{i}.post_attention_layernorm.weight

* Our format (`save_draft` / `load_draft`): `config.json` = `DraftConfig.to_dict()` (model_type
  "sparrow_draft") + `model.safetensors`. Strict: every missing, unexpected or misshaped key is an error.
* Official formats (`export_official(..., format=...)` / `import_official`), checked against the official
  modules themselves (bench/official_drafts.py, BENCHMARKS.md):
  - "sparrow" — Sparrow's `sparrow/model/cnets_sparrow.py`: the RMSNorm on e_t is the top-level
    `input_layernorm.weight` (ours: `embed_norm.weight`).
  - "eagle2" — EAGLE-2's `eagle/model/cnets1.py`: no embedding norm (e_t goes raw into fc), so only drafts
    with normalize_embeddings=False are representable.
  Both carry `embed_tokens.weight` [V, D] (Sparrow's loader never fills it from the target; EAGLE-2's
  copies the target's and the file's overrides it), a Llama/Qwen2-like `config.json` with EAGLE's keys
  `bias` (the fc bias, default true) and `qkv_bias` (without it their code builds q/k/v without bias).
  Their loaders use `load_state_dict(strict=False)`, so a misnamed key is silently ignored there; the
  export writes exactly the names their modules have. Import detects the format from the key names
  (`input_layernorm.weight` at top level = Sparrow) and, for our exports, the `sparrow_jax_format`
  config key, which must agree. EAGLE-3 drafts (`midlayer.*`, `d2t`/`t2d`) are refused.
  Sequence convention (not a property of the file): the official drafts are trained on sequences starting
  at t1 paired with h0 (`input_ids[:, 1:]`) at position 0; with that convention adopted in the engine and
  trainer (issue 9 §6), an imported draft sees the positions and context it was trained with.

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

__all__ = ["save_draft", "load_draft", "import_official", "export_official", "detect_format",
           "target_embedding", "draft_tensors", "OFFICIAL_FORMATS", "DraftFormatError", "CheckpointError",
           "DraftConfigError"]

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
OFFICIAL_FORMATS = ("sparrow", "eagle2")
FORMAT_KEY = "sparrow_jax_format"  # config.json key our exports add (official files have none)
OURS_NORM, SPARROW_NORM = "embed_norm.weight", "input_layernorm.weight"  # RMSNorm(e_t): ours / official Sparrow
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
        raise CheckpointError(f"{src}: model_type {raw.get('model_type')!r} is not 'sparrow_draft'; for the official "
                              "EAGLE-2 / Sparrow layouts (Llama/Qwen2-style config.json) use import_official(path, "
                              "target_cfg=...)")
    cfg = DraftConfig.from_dict(raw, source=src)
    _validate(cfg, src)
    if target_cfg is not None:
        cfg.check_fits(target_cfg, source=str(d))
    return _fill(cfg, _read_tensors(d), d, dtype)


# ---------------------------------------------------------------------------- official layouts

class DraftFormatError(ValueError):
    """A draft that cannot be written in the requested official format without changing what it computes."""


def _strip_prefix(tensors: dict, d: Path) -> dict:
    out = {}
    for k, v in tensors.items():
        k2 = k[len("model."):] if k.startswith("model.") else k
        if k2 in out:
            raise CheckpointError(f"{d}: weight {k2} appears both with and without the 'model.' prefix")
        out[k2] = v
    return out


def _official_format(raw: dict, files: dict[str, Path], d: Path) -> str:
    """'sparrow' or 'eagle2' from the (prefix-stripped) key names, checked against config.json's FORMAT_KEY."""
    eagle3 = sorted(k for k in files if k.startswith("midlayer.") or k in ("d2t", "t2d"))
    if eagle3:
        raise CheckpointError(f"{d}: looks like an EAGLE-3 draft (keys {_list(eagle3)}); EAGLE-3 (fused "
                              "multi-layer features, own vocab mapping) is not supported, only the EAGLE-2 and "
                              "Sparrow layouts")
    if OURS_NORM in files:
        raise CheckpointError(f"{files[OURS_NORM]}: key {OURS_NORM} is sparrow-jax's internal name; in the official "
                              f"Sparrow layout the embedding norm is {SPARROW_NORM} (rename the key, or re-export "
                              "with export_official(format='sparrow'))")
    fmt = "sparrow" if SPARROW_NORM in files else "eagle2"
    declared = raw.get(FORMAT_KEY)
    if declared is not None and declared != fmt:
        has = "has" if fmt == "sparrow" else "has no"
        raise CheckpointError(f"{d / 'config.json'}: {FORMAT_KEY} is {declared!r}, but the weights are the {fmt} "
                              f"layout (the file {has} top-level {SPARROW_NORM})")
    return fmt


def detect_format(path) -> str:
    """'ours' (save_draft), 'sparrow' (official Sparrow) or 'eagle2' (official EAGLE-2), from config.json and the
    tensor names (no tensor is read)."""
    d = Path(path)
    _check_dir(d)
    raw = _read_config(d)
    if raw.get("model_type") == "sparrow_draft":
        return "ours"
    return _official_format(raw, _strip_prefix(_weight_files(d), d), d)


def _official_config(raw: dict, tensors: dict, target_cfg, src: str, normalize: bool) -> tuple[DraftConfig, bool]:
    """Llama/Qwen2-like official config.json -> (DraftConfig, fc_has_bias), read as their code reads it."""
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
    theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))  # their LlamaRotaryEmbedding's default base
    head_dim = raw.get("head_dim")
    if head_dim is not None and int(head_dim) * nh != H:
        raise DraftConfigError(f"{src}: head_dim {head_dim} x num_attention_heads {nh} != hidden_size {H}; "
                               "drafts with a decoupled head_dim are not supported")
    if "qkv_bias" in raw:  # EAGLE's own key for the q/k/v bias
        qkv_bias = bool(raw["qkv_bias"])
    else:
        qkv_bias = "layers.0.self_attn.q_proj.bias" in tensors
        if qkv_bias:  # their code checks hasattr(config, "qkv_bias") and would drop these biases
            warnings.warn(f"{src}: no qkv_bias key but the weights have q/k/v biases; they are used here, while the "
                          "official EAGLE/Sparrow code builds q/k/v without bias for this config and ignores them",
                          stacklevel=3)
    vocab = raw.get("vocab_size", target_cfg.text.vocab_size)
    try:
        cfg = DraftConfig(
            hidden_size=H, intermediate_size=int(raw["intermediate_size"]), num_attention_heads=nh,
            num_key_value_heads=int(raw.get("num_key_value_heads") or nh), vocab_size=int(vocab),
            num_layers=int(raw.get("num_hidden_layers", 1)), rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta), hidden_act=raw.get("hidden_act", "silu"), qkv_bias=qkv_bias,
            normalize_embeddings=normalize,
            family="qwen2")  # their Llama layer == the Qwen2 layer up to the q/k/v bias, decided above
    except (TypeError, ValueError) as e:
        raise DraftConfigError(f"{src}: {e}") from None
    return cfg, bool(raw.get("bias", True))  # EAGLE/Sparrow: `bias` is the fc bias, default true


def import_official(path, *, target_cfg, dtype=jnp.float32, target_embedding=None) -> SparrowDraft:
    """Read an official EAGLE-2 or Sparrow draft (format detected, see `detect_format`) for `target_cfg`;
    a directory in our own format is passed to `load_draft`.

    * Key prefix `model.` is stripped.
    * Sparrow's `input_layernorm.weight` becomes our `embed_norm.weight` (normalize_embeddings=True); an
      EAGLE-2 draft has no embedding norm (normalize_embeddings=False).
    * `embed_tokens.weight` / `lm_head.weight`, when present, must have the target's [vocab, hidden] shape;
      their values are NOT used: the draft shares the target's embedding and head (the engine passes
      embeddings in and applies the target's head). Pass `target_embedding` ([V, D] array) to get a
      warning when the stored embedding differs from the target's (a draft trained for another model).
    * `layers.0.input_layernorm.weight` is accepted only if all ones: their first layer applies no input
      norm, so an all-ones weight is an untrained leftover of a converter that built a standard layer;
      any other value means the layer used it, which this architecture cannot represent.
    * `bias: false` (their fc without bias) loads as a zero fc bias.
    * The draft's vocab is the target's; a config `vocab_size` that differs is refused (check_fits).
    """
    d = Path(path)
    _check_dir(d)
    raw = _read_config(d)
    src = str(d / "config.json")
    if raw.get("model_type") == "sparrow_draft":  # our own format: same tensors, exact config
        return load_draft(d, dtype=dtype, target_cfg=target_cfg)
    tensors = _strip_prefix(_read_tensors(d), d)
    fmt = _official_format(raw, {k: f for k, (_, f) in tensors.items()}, d)
    cfg, fc_bias = _official_config(raw, tensors, target_cfg, src, normalize=fmt == "sparrow")
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
    if fmt == "sparrow":
        tensors[OURS_NORM] = tensors.pop(SPARROW_NORM)

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



def target_embedding(target) -> np.ndarray:
    """The target's input embedding table [V, D] (what `export_official` needs), through the family's `embed`."""
    V = target.cfg.text.vocab_size
    return np.asarray(target.embed(jnp.arange(V, dtype=jnp.int32)[None]))[0]


def export_official(draft: SparrowDraft, path, *, format: str, embed_tokens, force: bool = False) -> None:
    """Write `draft` in an official layout (`format` "sparrow" or "eagle2", see the module docstring) that the
    official loader consumes completely: model.safetensors with exactly their module's parameter names,
    `embed_tokens.weight` included, and a config.json their EConfig reads (+ FORMAT_KEY, `sparrow_family`).

    `embed_tokens`: the target's input embedding [V, D] (our draft shares it; Sparrow's loader takes it from
    the file only). A draft whose embedding norm the format cannot express (a normed draft as "eagle2", an
    unnormed one as "sparrow") raises DraftFormatError; `force=True` writes it anyway (norm dropped, resp.
    an all-ones norm added) with a warning, and the official code then computes something else."""
    if format not in OFFICIAL_FORMATS:
        raise ValueError(f"format {format!r}: expected one of {OFFICIAL_FORMATS} (our own format: save_draft)")
    cfg = draft.cfg
    if embed_tokens is None:
        raise ValueError("embed_tokens is required: pass the target's input embedding [vocab, hidden]")
    e = np.asarray(embed_tokens)
    if e.shape != (cfg.vocab_size, cfg.hidden_size):
        raise ValueError(f"embed_tokens has shape {e.shape}, expected the target's {(cfg.vocab_size, cfg.hidden_size)}")
    tensors = draft_tensors(draft)
    dt = tensors["fc.weight"].dtype
    norm = tensors.pop(OURS_NORM, None)
    problem = None
    if format == "eagle2" and norm is not None:
        problem = ("EAGLE-2's draft (eagle/model/cnets1.py) feeds e_t into fc without a norm, but this draft was "
                   "trained with RMSNorm(e_t) (normalize_embeddings=True)")
    elif format == "sparrow" and norm is None:
        problem = ("Sparrow's draft (sparrow/model/cnets_sparrow.py) always applies RMSNorm (input_layernorm) to "
                   "e_t, but this draft feeds e_t raw (normalize_embeddings=False)")
    if problem and not force:
        raise DraftFormatError(f"cannot export to {path} as {format!r}: {problem}. Use "
                               f"format={'sparrow' if format == 'eagle2' else 'eagle2'!r} or save_draft, or pass "
                               "force=True to write it anyway (outputs will differ)")
    if problem:
        warnings.warn(f"{path}: exported as {format!r} although {problem}; the official code will compute "
                      "something else than this draft", stacklevel=2)
    if format == "sparrow":
        tensors[SPARROW_NORM] = norm if norm is not None else np.ones((cfg.hidden_size,), dt)
    tensors["embed_tokens.weight"] = np.ascontiguousarray(e.astype(dt))
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
        "rope_theta": cfg.rope_theta,  # transformers 4.x (their pin) keeps this attribute as is
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # 5.x readers
        "vocab_size": cfg.vocab_size,
        "hidden_act": cfg.hidden_act,
        "bias": True,  # EAGLE/Sparrow: fc bias (ours always has one)
        "qkv_bias": cfg.qkv_bias,  # must be present: without it their attention has no q/k/v bias
        "attention_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": str(dt),
        FORMAT_KEY: format,
        "sparrow_family": cfg.family,
    }
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(hf, indent=2))
    _write_weights(d, tensors)

"""Our draft import/export against the official draft modules themselves, on identical inputs.

  SPARROW_OFFICIAL_CODE=/work/official/Sparrow EAGLE_OFFICIAL_CODE=/work/official/EAGLE \
      python bench/official_drafts.py

Each variable points at a checkout of the official code (its root, or the module file itself):
  SPARROW_OFFICIAL_CODE  -> sparrow/model/cnets_sparrow.py (Sparrow's draft; public copies of the Sparrow
                            inference code vendor it, e.g. github.com/ihbkaiser/VDFlash externals/Sparrow)
  EAGLE_OFFICIAL_CODE    -> eagle/model/cnets1.py (EAGLE-2's draft, github.com/SafeAILab/EAGLE)
A format whose variable is unset is skipped. Nothing of their code is copied here: the module is imported
from the checkout (as a standalone module, so their package __init__, which pulls in the whole speculative
stack, is not run) and used as is. Two shims, both outside their code:
  * config: they pin transformers 4.x, where `PretrainedConfig` keeps every config.json key as an attribute
    unchanged. transformers 5 moves `rope_theta` into `rope_parameters` and aliases `rope_scaling` to it,
    which their RoPE setup then reads as a scaling dict; `config_4x` builds the config the 4.x way (EConfig's
    defaults, then the JSON keys) and runs their own `_rope_scaling_validation` on it.
  * loading: `official_load` performs the same steps as their loaders (Sparrow `SpecModel.__init__`,
    EAGLE `EaModel.__init__` + `from_pretrained`): EConfig from config.json, `bias` read from the JSON,
    `Model(config, bias=..., path=<base model>, ...)` (Sparrow: load_emb False; EAGLE: load_emb True, reading
    the base model's `model.embed_tokens.weight` from a sharded index), the safetensors state dict, then
    `load_state_dict(strict=False)`. Their loaders silently ignore unknown keys, so every key must be consumed
    (no missing, no unexpected) for the check to pass. The base model is replaced by a directory that holds
    only the target's embedding (all their loader reads from it).

Checks, per format (sparrow, eagle2) and draft depth (1 and 2 layers), fp32 on CPU:
  official->ours  a random official draft (every parameter random, norms too), saved as their training
                  code saves it (accelerate `save_state`: the module's state dict as safetensors, format "pt")
                  next to a config.json in their style, read by `import_official`; outputs compared.
  ours->official  a random draft of ours, written by `export_official(format=...)` with the target's
                  embedding, read by their loader; outputs compared.
Inputs are identical on both sides: token ids t (the official module embeds them with its `embed_tokens`,
ours gets e_t = E[t] from the same table E), target states h_{t-1}, explicit positions 0..T-1 (EAGLE's
cache-less RoPE table stops at T), a causal mask over the sequence. Reported: max |diff| of the draft
output states and of logits through a random LM head, and top-1 agreement. A check fails when max |diff| exceeds REL_TOL times the
largest output magnitude (the random drafts' outputs are ~30), or on an unconsumed key.
The configuration is configs/tiny.json's LM (hidden 256, 4 heads / 2 KV heads, vocab 4096).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import environment, write_jsonl  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
REL_TOL = 1e-5  # max |diff| / max |official output|; fp32 rounding of outputs of size ~30 gives ~2e-6
OFFICIAL = {  # format -> (environment variable, module path inside the checkout)
    "sparrow": ("SPARROW_OFFICIAL_CODE", "sparrow/model/cnets_sparrow.py"),
    "eagle2": ("EAGLE_OFFICIAL_CODE", "eagle/model/cnets1.py"),
}


# --------------------------------------------------------------------------------- their code, as is

def official_file(fmt: str) -> Path | None:
    """The official module file for `fmt` from its environment variable (None when unset)."""
    var, rel = OFFICIAL[fmt]
    val = os.environ.get(var)
    if not val:
        return None
    p = Path(val)
    f = p if p.is_file() else p / rel
    if not f.is_file():
        raise FileNotFoundError(f"{var}={val}: neither a file nor a checkout containing {rel}")
    return f


def source_info(f: Path) -> dict:
    """Where the official module came from: its sha256, and the git commit when it sits in a git checkout."""
    info = {"file": str(f), "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
    try:
        info["git_commit"] = subprocess.run(["git", "-C", str(f.parent), "rev-parse", "HEAD"], capture_output=True,
                                            text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def load_module(f: Path):
    """Import their draft module standalone: a synthetic parent package whose path is the module's folder, so
    its relative imports (.configs, .choices, .utils_c) resolve to the files next to it."""
    pkg_name = f"_official_{hashlib.sha1(str(f).encode()).hexdigest()[:8]}"
    if pkg_name not in sys.modules:
        pkg = types.ModuleType(pkg_name)
        pkg.__path__ = [str(f.parent)]
        sys.modules[pkg_name] = pkg
    name = f"{pkg_name}.{f.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, f)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def config_4x(EConfig, config_json: Path):
    """Their EConfig as transformers 4.x builds it: __init__ defaults, then every config.json key unchanged."""
    attrs = {k: p.default for k, p in inspect.signature(EConfig.__init__).parameters.items()
             if p.default is not inspect.Parameter.empty}
    attrs.update(json.loads(config_json.read_text()))
    if attrs.get("num_key_value_heads") is None:  # EConfig.__init__'s backward-compatibility rule
        attrs["num_key_value_heads"] = attrs["num_attention_heads"]
    cfg = types.SimpleNamespace(**attrs)
    EConfig._rope_scaling_validation(cfg)
    return cfg


def official_load(mod, fmt: str, draft_dir: Path, base_dir: Path):
    """Their loader's steps (see the module docstring). Returns (model, missing_keys, unexpected_keys)."""
    import safetensors.torch  # noqa: PLC0415

    config = config_4x(mod.EConfig, draft_dir / "config.json")
    con = json.loads((draft_dir / "config.json").read_text())
    bias = con.get("bias", True)
    if fmt == "sparrow":  # SpecModel.__init__ (load_emb stays False) + from_pretrained's safetensors branch
        model = mod.Model(config, bias=bias, path=str(base_dir), total_tokens=30, depth=3, top_k=8, threshold=1.0)
        state = safetensors.torch.load_file(str(draft_dir / "model.safetensors"))  # safetensors, not pickle
    else:  # EaModel.__init__ with use_eagle3=False (cnets1.Model, load_emb=True) + from_pretrained
        model = mod.Model(config, bias=bias, total_tokens=30, depth=3, top_k=8, threshold=1.0, path=str(base_dir),
                          load_emb=True)
        state = safetensors.torch.load_file(str(draft_dir / "model.safetensors"))
    res = model.load_state_dict(state, strict=False)
    model.init_tree()
    return model.eval(), list(res.missing_keys), list(res.unexpected_keys)


def official_save(model, config: dict, d: Path) -> None:
    """As their training saves a draft: accelerate's save_state writes the module's state dict as safetensors."""
    import safetensors.torch  # noqa: PLC0415

    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(config, indent=2))


def official_config(fmt: str, t, layers: int) -> dict:
    """A draft config.json in their style for the target LM `t`: Sparrow trains with ViSpec's Qwen2.5-VL
    template (model_type qwen2_5_vl, qkv_bias, rope_theta, no `bias` key); EAGLE-2's Qwen2 drafts carry a
    Qwen2 config plus `qkv_bias`/`bias`."""
    c = {"hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
         "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
         "num_hidden_layers": layers, "rms_norm_eps": t.rms_norm_eps, "rope_theta": t.rope_theta,
         "vocab_size": t.vocab_size, "hidden_act": t.hidden_act, "max_position_embeddings": 8192,
         "qkv_bias": True, "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.49.0"}
    if fmt == "sparrow":
        c.update(architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl")
    else:
        c.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", bias=True)
    return c


def write_base_model(d: Path, embedding: np.ndarray) -> Path:
    """A stand-in base-model directory holding only `model.embed_tokens.weight` behind a sharded index (what
    EAGLE's load_emb reads)."""
    from safetensors.numpy import save_file  # noqa: PLC0415

    d.mkdir(parents=True, exist_ok=True)
    shard = "model-00001-of-00001.safetensors"
    save_file({"model.embed_tokens.weight": embedding}, str(d / shard), metadata={"format": "pt"})
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.embed_tokens.weight": shard}}))
    return d


# ------------------------------------------------------------------------------------------ checks

def _randomize_torch(model, embedding: np.ndarray, seed: int) -> None:
    """Every parameter random (norms ~1, linears/biases ~0.1) so a dropped or swapped tensor shows; the
    embedding is the target's."""
    import torch  # noqa: PLC0415

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "embed_tokens.weight":
                p.copy_(torch.from_numpy(embedding))
            else:
                base = 1.0 if "norm" in name else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))


def _random_ours(cfg, seed: int):
    import jax.numpy as jnp  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from sparrow_jax.models.draft import SparrowDraft  # noqa: PLC0415

    draft = nnx.eval_shape(lambda: SparrowDraft(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    new = []
    for p, v in nnx.to_flat_state(nnx.state(draft, nnx.Param)):
        w = rng.standard_normal(v.shape).astype(np.float32)
        new.append((p, v.replace(jnp.asarray(1.0 + 0.1 * w if p[-1] == "weight" else 0.1 * w))))
    nnx.update(draft, nnx.from_flat_state(new))
    return draft


def _inputs(t, B=2, T=12, seed=5):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, t.vocab_size, (B, T))
    h = rng.standard_normal((B, T, t.hidden_size)).astype(np.float32)
    pos = np.tile(np.arange(T), (B, 1))  # EAGLE's RoPE table covers positions < T without a cache
    return ids, h, pos


def _compare(official_model, ours, embedding: np.ndarray, head: np.ndarray, t) -> dict:
    import jax.numpy as jnp  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from sparrow_jax.models.attention import MaskSpec  # noqa: PLC0415

    ids, h, pos = _inputs(t)
    B, T = ids.shape
    with torch.no_grad():
        y_off = official_model(torch.from_numpy(h), input_ids=torch.from_numpy(ids),
                               position_ids=torch.from_numpy(pos)).numpy()
    y_ours, _ = ours(jnp.asarray(embedding[ids]), jnp.asarray(h), jnp.asarray(pos, jnp.int32),
                     MaskSpec(kv_len_B=jnp.full((B,), T, jnp.int32), causal=True))
    y_ours = np.asarray(y_ours)
    lo, lt = y_off @ head.T, y_ours @ head.T
    diff, scale = float(np.max(np.abs(y_off - y_ours))), float(np.max(np.abs(y_off)))
    return {"max_abs_diff_hidden": diff, "max_abs_hidden": scale, "rel_diff_hidden": diff / scale,
            "max_abs_diff_logits": float(np.max(np.abs(lo - lt))),
            "top1_agreement": float(np.mean(lo.argmax(-1) == lt.argmax(-1)))}


def check(fmt: str, layers: int, work: Path, target_cfg=None) -> list[dict]:
    """Both directions for one official module; returns the records (raises if its env variable is unset)."""
    from sparrow_jax.io.draft_checkpoint import detect_format, export_official, import_official  # noqa: PLC0415
    from sparrow_jax.models.draft import DraftConfig  # noqa: PLC0415

    f = official_file(fmt)
    if f is None:
        raise RuntimeError(f"{OFFICIAL[fmt][0]} is not set")
    mod = load_module(f)
    tcfg = target_cfg or _tiny_target_cfg()
    t = tcfg.text
    rng = np.random.default_rng(layers)
    embedding = rng.standard_normal((t.vocab_size, t.hidden_size)).astype(np.float32)
    head = (0.05 * rng.standard_normal((t.vocab_size, t.hidden_size))).astype(np.float32)
    base = write_base_model(work / f"{fmt}-L{layers}-base", embedding)
    src = source_info(f)
    records = []

    # official -> ours
    d = work / f"{fmt}-L{layers}-official"
    cfg_json = official_config(fmt, t, layers)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg_json))
    off = mod.Model(config_4x(mod.EConfig, d / "config.json"), bias=True, total_tokens=30, depth=3, top_k=8)
    _randomize_torch(off, embedding, seed=layers)
    off.init_tree()
    off.eval()
    official_save(off, cfg_json, d)
    detected = detect_format(d)
    ours = import_official(d, target_cfg=tcfg, target_embedding=embedding)
    rec = {"direction": "official->ours", "format": fmt, "layers": layers, "detected": detected,
           "normalize_embeddings": ours.cfg.normalize_embeddings, **_compare(off, ours, embedding, head, t)}
    rec["ok"] = detected == fmt and rec["rel_diff_hidden"] <= REL_TOL
    records.append(rec)

    # ours -> official
    mine = _random_ours(DraftConfig.for_target(tcfg, num_layers=layers, normalize_embeddings=fmt == "sparrow"),
                        seed=10 + layers)
    d = work / f"{fmt}-L{layers}-ours"
    export_official(mine, d, format=fmt, embed_tokens=embedding)
    off2, missing, unexpected = official_load(mod, fmt, d, base)
    rec = {"direction": "ours->official", "format": fmt, "layers": layers, "missing_keys": missing,
           "unexpected_keys": unexpected, **_compare(off2, mine, embedding, head, t)}
    rec["ok"] = not missing and not unexpected and rec["rel_diff_hidden"] <= REL_TOL
    records.append(rec)
    for r in records:
        r["official"] = src
    return records


def _tiny_target_cfg():
    from sparrow_jax.models import registry  # noqa: PLC0415

    root = Path(__file__).resolve().parents[1]
    return registry.config_from_dict(*registry.read_config_dict(str(root / "configs" / "tiny.json")))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default=str(RESULTS / "official_drafts.jsonl"))
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import jax  # noqa: PLC0415
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    jax.config.update("jax_default_matmul_precision", "highest")
    env = {**environment(), "torch": torch.__version__, "transformers": transformers.__version__}
    formats = [fmt for fmt in OFFICIAL if official_file(fmt) is not None]
    if not formats:
        print(f"set {' and/or '.join(v for v, _ in OFFICIAL.values())} to official checkouts", file=sys.stderr)
        return 2
    print(f"# {env['command']}\n# {env['date']}, {env['machine']}, jax {env['jax']}, torch {env['torch']}, "
          f"transformers {env['transformers']}, fp32")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in formats:
            for layers in args.layers:
                for r in check(fmt, layers, Path(tmp)):
                    ok &= r["ok"]
                    keys = "" if r["direction"] == "official->ours" else \
                        f"  missing {r['missing_keys']} unexpected {r['unexpected_keys']}"
                    print(f"{fmt:8s} L={layers} {r['direction']:15s} max|dh| {r['max_abs_diff_hidden']:.2e} "
                          f"(of |h| {r['max_abs_hidden']:.1f}: {r['rel_diff_hidden']:.1e})  "
                          f"max|dlogits| {r['max_abs_diff_logits']:.2e}  top1 {r['top1_agreement']:.3f}  "
                          f"{'ok' if r['ok'] else 'FAIL'}{keys}")
                    write_jsonl(args.out, {"bench": "official_drafts", **env, **r})
    for fmt in formats:
        print(f"# {fmt}: {source_info(official_file(fmt))}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

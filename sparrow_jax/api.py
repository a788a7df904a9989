"""The public Python API: load a target (and a draft) once, then generate for batches of prompts with
videos or images — speculative (Sparrow and the baselines' views) or AR — and get back, per row, the
text, the token ids and the metrics record decode.py writes.

    from sparrow_jax import SpecDecoder
    decoder = SpecDecoder.from_pretrained("shipped/tiny-qwen2.5-vl", draft_dir="shipped/drafts/sparrow")
    [out] = decoder.generate(["Describe the video."], videos=["clip.mp4"], max_new_tokens=32)
    print(out.text, out.token_ids, out.metrics["tau"])

One frozen `DecodeConfig` holds a decode's settings; a decoder keeps a default one and `generate`
takes field overrides. Only what shapes the compiled programs (tree, max_new_tokens, greedy vs
sampling, the prompt's bucket) is static: new sampling values, seeds or prompts of the same bucket
reuse the compiled programs. decode.py is a CLI over this module: its flags build one DecodeConfig,
which runs the engine and is written into every JSON line.

`Processor` turns text + videos/images into a target's prompts from its directory alone (config.json,
tokenizer, preprocessor JSON files) — no weights — so inputs can be checked before a model is loaded.
"""

from __future__ import annotations

import dataclasses
import os
import time
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparrow_jax import runtime
from sparrow_jax.decoding import engine as E
from sparrow_jax.decoding import placement as PL
from sparrow_jax.decoding import tree_choice
from sparrow_jax.decoding.autoregressive import ar_generate, cache_capacity
from sparrow_jax.decoding.metrics import acceptance_summary
from sparrow_jax.decoding.sampling import SamplingParams
from sparrow_jax.decoding.tree import TreeSpec
from sparrow_jax.io import vision_inputs as vi
from sparrow_jax.io.draft_checkpoint import import_official
from sparrow_jax.io.text import load_codec
from sparrow_jax.models import registry, views
from sparrow_jax.models import target as tg
from sparrow_jax.models.attention import IMPL_KINDS
from sparrow_jax.models.draft import DraftConfig, SparrowDraft

__all__ = ["DecodeConfig", "GenerationOutput", "Processor", "SamplingParams", "SpecDecoder", "VisionOptions"]

# Decode modes (decode.py --mode) and the engine mode each runs (models/views.py: the draft's view).
ENGINE_MODE = {"sparrow": "text_only", **{m: m for m in views.MODE_VIEW if m != "text_only"}}
MODES = ("ar", *ENGINE_MODE)
ATTENTION = IMPL_KINDS  # DecodeConfig.attention: a string (it is recorded); EngineConfig converts it
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
RANDOM_DRAFT = "random draft (lossless, but rarely accepted)"


# ------------------------------------------------------------------------------------------ config


class DecodeConfigError(ValueError):
    """A decode setting that cannot work (decode.py: a usage error, exit 2)."""


@dataclasses.dataclass(frozen=True)
class VisionOptions:
    """How videos and images are read. None: the target's preprocessor JSON files decide (Qwen2.5-VL),
    and one visual may take 90 % of the context (qwen-vl-utils' VIDEO_TOTAL_PIXELS rule)."""

    fps: float | None = None  # Qwen2.5-VL: frames sampled per second of presentation time
    max_frames: int | None = None  # Qwen2.5-VL
    min_pixels: int | None = None  # Qwen2.5-VL: per-frame pixel floor
    max_pixels: int | None = None  # Qwen2.5-VL: per-frame pixel cap
    num_frames: int = 32  # LLaVA-OneVision: frames sampled uniformly per video
    max_visual_tokens: int | None = None  # budget of one visual: frames shrunk, then fewer sampled


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """The whole configuration of a decode (dataclasses.asdict of it is in every record).

    mode: "ar" (the target alone) or the draft view to run: "sparrow" (text-only draft), "ivsb_mid",
    "full_visual" (MSD-style), "pruned_visual". tree: TOTAL-DEPTH-TOPK in EAGLE-2's notation, chainN,
    or "auto" (the draft directory's tree_choice.json for the prompt's visual length, else 48-5-10).
    sampling: one SamplingParams for every row or one per row (temperature 0 = greedy). m_star,
    keep_fraction, prune_by: None = the draft's trained settings. force_view: run a draft in a view it
    was not trained for (lossless, but its inputs differ from training). mesh: "data=D,tensor=T" runs the
    target tensor-parallel (heads, MLP, vocab and the KV cache's KV heads split over T devices, rows
    over D; the draft replicated; decoding/placement.py); the tokens are those of one device."""

    mode: str = "sparrow"
    tree: str = "auto"
    max_new_tokens: int = 32
    sampling: SamplingParams | tuple[SamplingParams, ...] = SamplingParams()
    seed: int = 0
    attention: str = "xla"
    m_star: int | None = None
    keep_fraction: float | None = None
    prune_by: str | None = None
    force_view: bool = False
    vision: VisionOptions = VisionOptions()
    mesh: str | None = None  # "data=D,tensor=T": the target tensor-parallel over D*T devices (None: one device)

    def __post_init__(self):
        if self.mode not in MODES:
            raise DecodeConfigError(f"mode {self.mode!r}: expected one of {list(MODES)}")
        if self.attention not in ATTENTION:
            raise DecodeConfigError(f"attention {self.attention!r}: expected one of {list(ATTENTION)}")
        if self.prune_by is not None and self.prune_by not in views.PRUNE_RULES:
            raise DecodeConfigError(f"prune_by {self.prune_by!r}: expected one of {list(views.PRUNE_RULES)}")
        if isinstance(self.sampling, (list, tuple)):  # per row; a tuple keeps the config hashable
            object.__setattr__(self, "sampling", tuple(self.sampling))
            rows = self.sampling
        else:
            rows = (self.sampling,)
        if not rows or not all(isinstance(s, SamplingParams) for s in rows):
            raise DecodeConfigError(f"sampling {self.sampling!r}: expected a SamplingParams or one per row")
        if not isinstance(self.vision, VisionOptions):
            raise DecodeConfigError(f"vision {self.vision!r}: expected a VisionOptions")
        if self.max_new_tokens is None:
            raise DecodeConfigError("max_new_tokens None: must be positive")
        check_settings(self.settings())

    def settings(self) -> dict:
        """The flat settings `check_settings` / `check_for_target` read (top_k: the largest row's)."""
        rows = self.sampling if isinstance(self.sampling, tuple) else (self.sampling,)
        return {"mode": self.mode, "tree": self.tree, "max_new_tokens": self.max_new_tokens, "m_star": self.m_star,
                "keep_fraction": self.keep_fraction, "prune_by": self.prune_by,
                "top_k": max(s.top_k for s in rows), "mesh": self.mesh, **dataclasses.asdict(self.vision)}

    def row_sampling(self, row: int) -> SamplingParams:
        return self.sampling[row] if isinstance(self.sampling, tuple) else self.sampling

    @classmethod
    def from_dict(cls, d: Mapping) -> DecodeConfig:
        """The inverse of dataclasses.asdict: rebuild the config a record was decoded with."""
        d = dict(d)
        s = d.get("sampling", {})
        d["sampling"] = (tuple(SamplingParams(**x) for x in s) if isinstance(s, (list, tuple))
                         else SamplingParams(**s))
        d["vision"] = VisionOptions(**d.get("vision", {}))
        return cls(**d)


# Settings that must be positive when given (None = not given).
POSITIVE = ("max_new_tokens", "fps", "max_frames", "num_frames", "max_pixels", "min_pixels", "max_visual_tokens",
            "m_star")


def check_settings(values: Mapping, name: Callable[[str], str] = str) -> TreeSpec | None:
    """The rules on decode settings that need no model, for DecodeConfig and decode.py's flags alike
    (`name` spells a setting in messages: the field, or the flag). `values` maps settings to values,
    None = not given; absent settings are not checked. Returns the parsed tree (None for auto)."""
    def given(key):
        return values.get(key) is not None

    for key in POSITIVE:
        if given(key) and not values[key] > 0:
            raise DecodeConfigError(f"{name(key)} {values[key]}: must be positive")
    if given("min_pixels") and given("max_pixels") and values["min_pixels"] > values["max_pixels"]:
        raise DecodeConfigError(f"{name('min_pixels')} {values['min_pixels']} is above {name('max_pixels')} "
                                f"{values['max_pixels']}")
    if given("temperature") and values["temperature"] < 0:
        raise DecodeConfigError(f"{name('temperature')} {values['temperature']}: must be >= 0 (0 = greedy)")
    if given("top_p") and not 0 < values["top_p"] <= 1:
        raise DecodeConfigError(f"{name('top_p')} {values['top_p']}: must be in (0, 1]")
    if given("top_k") and values["top_k"] < 0:
        raise DecodeConfigError(f"{name('top_k')} {values['top_k']}: must be >= 0 (0 = off)")
    if values.get("mode") != "pruned_visual":
        for key in ("keep_fraction", "prune_by"):
            if given(key):
                raise DecodeConfigError(f"{name(key)} applies to {name('mode')} pruned_visual only "
                                        f"(mode is {values.get('mode')})")
    if given("keep_fraction") and not 0 < values["keep_fraction"] <= 1:
        raise DecodeConfigError(f"{name('keep_fraction')} {values['keep_fraction']}: must be in (0, 1] (the share of "
                                "visual positions the draft keeps)")
    if given("mesh"):
        try:
            PL.parse_mesh(values["mesh"], name("mesh"))
        except PL.MeshError as e:
            raise DecodeConfigError(str(e)) from None
    text = values.get("tree", "auto")
    if text == "auto":  # resolved once the prompts are built (resolve_tree)
        return None
    try:
        return TreeSpec.parse(text)
    except ValueError as e:
        raise DecodeConfigError(f"{name('tree')} {text}: {str(e).removeprefix(f'tree {text!r}: ')}; the notation is "
                                "TOTAL-DEPTH-TOPK (e.g. 48-5-10: 48 nodes with the root, 5 expansion steps, top-10), "
                                "chainN (N draft tokens, e.g. chain4) or auto") from None


def check_for_target(values: Mapping, cfg, name: Callable[[str], str] = str) -> None:
    """The rules on decode settings that need the target's config (read before any weights); the mesh
    also against this process's devices and, when `values` has it, the batch's row count."""
    try:
        PL.check_mesh(values.get("mesh"), cfg, devices=jax.devices(), batch=values.get("batch"), name=name("mesh"))
    except PL.MeshError as e:
        raise DecodeConfigError(str(e)) from None
    L, V = cfg.num_layers, cfg.text.vocab_size
    m_star, top_k = values.get("m_star"), values.get("top_k")
    if m_star is not None and not 0 < m_star < L:
        raise DecodeConfigError(f"{name('m_star')} {m_star}: must be inside the target's decoder stack (1..{L - 1})")
    if top_k is not None and top_k > V:
        raise DecodeConfigError(f"{name('top_k')} {top_k}: exceeds the target's vocabulary of {V} tokens")
    tree = check_settings({"tree": values.get("tree", "auto")}, name)
    if values.get("mode") != "ar" and tree is not None and tree.top_k > V:
        raise DecodeConfigError(f"{name('tree')} {values['tree']}: top-k {tree.top_k} exceeds the target's "
                                f"vocabulary of {V} tokens")
    for key in registry.foreign_video_options(cfg):  # those without a default only (num_frames has one)
        if getattr(VisionOptions(), key, None) is None and values.get(key) is not None:
            raise DecodeConfigError(f"{name(key)} applies to {registry.video_option_owners(key)} targets; "
                                    f"{registry.frames_note(cfg, name)}")


def resolve_tree(text: str, draft_dir, prompts) -> tuple[TreeSpec, str | None]:
    """(tree, note): a given tree, or for "auto" the draft directory's stored choice for the longest
    row's visual tokens on this backend (tree_choice.auto_tree) and the one-line note saying why."""
    tree = check_settings({"tree": text})
    if tree is not None:
        return tree, None
    nvis = max(tree_choice.visual_tokens(p) for p in prompts)
    return tree_choice.auto_tree(draft_dir, nvis, jax.default_backend())


# ------------------------------------------------------------------------------------------ inputs


def _as_rows(items, n: int, what: str) -> list:
    """None, one item (a single row) or one entry per prompt (None = no visual) -> a list of n entries."""
    if items is None:
        return [None] * n
    if isinstance(items, (str, os.PathLike, np.ndarray)) or not isinstance(items, Sequence):
        items = [items]
    items = list(items)
    if len(items) != n:
        raise ValueError(f"{what}: {len(items)} given for {n} prompt(s); pass one per prompt (None for a prompt "
                         f"without one)")
    return items


class Processor:
    """A target's input side, from its directory alone: the config (config.json), the tokenizer
    (tokenizer.json, else a byte codec) and the preprocessing (preprocessor_config.json,
    video_preprocessor_config.json). Builds the chat prompts, one visual per row at most."""

    def __init__(self, cfg, *, model_dir=None, tokenizer_dir=None, codec=None):
        self.cfg = cfg
        self.model_dir = None if model_dir is None else Path(model_dir)
        self.tokenizer_dir = tokenizer_dir
        self._codec = codec

    @classmethod
    def from_pretrained(cls, target_dir) -> Processor:
        """A HF checkpoint directory: its config, tokenizer and preprocessor files."""
        return cls._read(target_dir, tokenizer_dir=target_dir)

    @classmethod
    def from_config(cls, config_json, *, tokenizer_dir=None) -> Processor:
        """An architecture only (a config.json file or its directory), for a random-initialised target;
        the tokenizer from `tokenizer_dir` (default: a byte codec)."""
        return cls._read(config_json, tokenizer_dir=tokenizer_dir)

    @classmethod
    def _read(cls, path, *, tokenizer_dir) -> Processor:
        cfg = registry.config_from_dict(*registry.read_config_dict(path))
        p = Path(path)
        return cls(cfg, model_dir=p if p.is_dir() else p.parent, tokenizer_dir=tokenizer_dir)

    @property
    def codec(self):
        """Text <-> ids (loaded on first use: a bad tokenizer is reported after the settings)."""
        if self._codec is None:
            self._codec = load_codec(self.tokenizer_dir, self.cfg.text.vocab_size)
        return self._codec

    def budget(self, opts: VisionOptions) -> int:
        """Visual tokens one video or image may take."""
        return opts.max_visual_tokens or vi.default_max_visual_tokens(self.cfg.text.max_position_embeddings)

    def __call__(self, prompts: str | Sequence[str], videos=None, images=None,
                 vision: VisionOptions = VisionOptions()) -> list:
        """Chat prompts, one per text: the system/user prefix, the row's video or image (path; an image
        may also be a PIL image or uint8 array), the question, the assistant prefix. `videos` / `images`:
        None, or one entry per prompt (None for a prompt without one). Visuals are read row by row."""
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not texts:
            raise ValueError("prompts: none given")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"prompts: row {i} is a {type(t).__name__}, expected a str")
        videos, images = _as_rows(videos, len(texts), "videos"), _as_rows(images, len(texts), "images")
        for i, (v, im) in enumerate(zip(videos, images)):
            if v is not None and im is not None:
                raise ValueError(f"row {i}: both a video and an image; one visual per prompt")
        fam = registry.family_of(self.cfg)
        options = {k: getattr(vision, k) for k in fam.video_options}
        read = fam.visual_readers(self.cfg, self.model_dir, budget=self.budget(vision), options=options)
        visuals = [read.video(v) if v is not None else read.image(im) if im is not None else None
                   for v, im in zip(videos, images)]
        return [fam.chat_prompt(self.cfg, self.codec, vis, text) for text, vis in zip(texts, visuals)]

    def check_context(self, prompts, max_new_tokens: int) -> None:
        """Refuse prompts that run past the target's context, before any weights are read (the rule of
        target.check_context, on the prompts' lengths and M-RoPE deltas)."""
        cfg = self.cfg
        lengths = [len(p.input_ids) for p in prompts]
        deltas = [registry.family_of(cfg).rope_delta(p, cfg) for p in prompts]
        tg.check_context(types.SimpleNamespace(lengths_B=lengths, rope_delta_B=deltas), cfg.text, max_new_tokens)


# ------------------------------------------------------------------------------------------ decoding


@dataclasses.dataclass(frozen=True)
class Run:
    """One decoded batch on the host: tokens (row b valid up to num_tokens_B[b], EOS included), the
    prefill and decode wall times, the padded batch, and for a speculative run the tokens emitted per
    round (accepted_BR) and whether the round was cut short (cut_BR)."""

    config: DecodeConfig
    tree: TreeSpec  # the resolved tree (an AR run: it only sizes the cache, as the speculative run's)
    m_star: int  # the bridge layer the prefill used
    tokens_BM: np.ndarray
    num_tokens_B: np.ndarray
    prefill_s: float
    decode_s: float
    batch: tg.PrefillBatch
    accepted_BR: np.ndarray | None = None
    cut_BR: np.ndarray | None = None

    @property
    def speculative(self) -> bool:
        return self.config.mode != "ar"

    def token_ids(self, row: int) -> list[int]:
        return self.tokens_BM[row, :self.num_tokens_B[row]].tolist()

    def acceptance(self) -> dict:
        """τ, acceptance per depth, ... (metrics.acceptance_summary) of a speculative run; {} for AR."""
        if not self.speculative:
            return {}
        return acceptance_summary(self.accepted_BR, self.tree.max_draft_tokens, self.cut_BR)


@dataclasses.dataclass(frozen=True)
class GenerationOutput:
    """One row's answer: its text, its token ids (EOS included) and its metrics record — decode.py's
    JSON line: mode, tree, m*, batch, sampling, prefill/decode seconds, τ and acceptance per depth
    (the batch's, speculative modes), the DecodeConfig as a dict, prompt and visual token counts."""

    text: str
    token_ids: list[int]
    metrics: dict


class SpecDecoder:
    """A target (and a draft) loaded once; `generate` decodes batches of prompts with any DecodeConfig.
    Without a draft, speculative modes use a random draft of the mode's view: the output is still
    exactly the target's (the verifier guarantees it), but few drafts are accepted."""

    def __init__(self, processor: Processor, target, draft: SparrowDraft | None = None, *,
                 config: DecodeConfig = DecodeConfig(), target_source: str = "target", draft_dir=None,
                 draft_source: str | None = None, seed: int = 0, dtype=jnp.float32):
        self.processor, self.target, self.draft, self.config = processor, target, draft, config
        self.target_source, self.draft_dir, self.seed, self.dtype = target_source, draft_dir, seed, dtype
        self.draft_source = draft_source or (str(draft_dir) if draft_dir is not None else
                                             "draft" if draft is not None else RANDOM_DRAFT)
        self.tgraph, self.tparams = nnx.split(target)  # split once: every call hits the same compiled programs
        # CPU backend: one worker per core even after idle (runtime.py); records say how many were pinned
        self.cpu_workers_pinned = len(runtime.pin_cpu_workers())
        self._random_drafts: dict[str, SparrowDraft] = {}
        self._draft_splits: dict[int, tuple] = {}  # id(draft) -> (draft, (dgraph, dparams)), redone by `place`
        self.mesh_spec: PL.MeshSpec | None = None  # where the parameters are placed now (None: one device)
        self.placement: PL.Placement | None = None
        self.place(config.mesh)

    def place(self, mesh: str | PL.MeshSpec | None) -> PL.Placement | None:
        """Put the target's parameters on `mesh` (from their declared axes; None: back on one device) and
        the drafts replicated, unless they are there already; the Placement the decode programs take."""
        spec = PL.check_mesh(mesh, self.target.cfg, devices=jax.devices())
        if spec == self.mesh_spec:
            return self.placement
        if spec is None:
            self.placement, on = None, jax.sharding.SingleDeviceSharding(jax.devices()[0])
            t_on = on
        else:
            self.placement = PL.Placement.for_target(nnx.state(self.target), PL.make_mesh(spec))
            t_on, on = self.placement.target_params, self.placement.replicated
        PL.place_model(self.target, t_on)
        for d in (self.draft, *self._random_drafts.values()):
            if d is not None:
                PL.place_model(d, on)
        self.mesh_spec = spec
        self.tgraph, self.tparams = nnx.split(self.target)
        self._draft_splits = {}
        return self.placement

    def _split_draft(self, draft) -> tuple:
        """(dgraph, dparams) of a draft, split once per placement (one GraphDef object: its hash is cached)."""
        hit = self._draft_splits.get(id(draft))
        if hit is None or hit[0] is not draft:
            hit = self._draft_splits[id(draft)] = (draft, nnx.split(draft))
        return hit[1]

    @classmethod
    def from_pretrained(cls, target_dir, draft_dir=None, *, config: DecodeConfig | None = None,
                        dtype="float32", seed: int = 0, processor: Processor | None = None,
                        source: str | None = None) -> SpecDecoder:
        """Load a HF checkpoint directory (family from config.json's model_type) and a draft directory
        (ours, or the official Sparrow / EAGLE-2 format). `config`: the default DecodeConfig (its mode's
        view is checked against the draft's now). `source`: how records name the target (default: the
        directory). `seed`: the random draft's initialisation when there is no draft."""
        processor = processor or Processor.from_pretrained(target_dir)
        return cls._load(processor, target_dir, draft_dir, config, dtype, seed, source or str(target_dir))

    @classmethod
    def from_config(cls, config_json, draft_dir=None, *, tokenizer_dir=None, config: DecodeConfig | None = None,
                    dtype="float32", seed: int = 0, processor: Processor | None = None,
                    source: str | None = None) -> SpecDecoder:
        """A randomly initialised target of an architecture (config.json file or directory; `seed`):
        the pipeline runs, the answers are noise. Otherwise as `from_pretrained`."""
        processor = processor or Processor.from_config(config_json, tokenizer_dir=tokenizer_dir)
        return cls._load(processor, None, draft_dir, config, dtype, seed, source or f"random init of {config_json}")

    @classmethod
    def _load(cls, processor, target_dir, draft_dir, config, dtype, seed, source) -> SpecDecoder:
        config = config or DecodeConfig()
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ValueError(f"dtype {dtype!r}: expected one of {list(DTYPES)}")
            dtype = DTYPES[dtype]
        cfg = processor.cfg
        check_for_target(config.settings(), cfg)
        # Order: the draft (small, and its fit to the target is checked from config.json), then the target.
        draft = import_official(draft_dir, target_cfg=cfg, dtype=dtype) if draft_dir is not None else None
        if draft is not None and config.mode != "ar":
            views.check_draft_view(draft.cfg.visual_view, ENGINE_MODE[config.mode], allow_mismatch=config.force_view,
                                   source=f"draft {draft_dir}")
        if target_dir is not None:
            target = registry.load_target(target_dir, dtype=dtype)
        else:
            target = registry.build_target(cfg, rngs=nnx.Rngs(seed), dtype=dtype)
        dec = cls(processor, target, draft, config=config, target_source=source, draft_dir=draft_dir, seed=seed,
                  dtype=dtype)
        if draft is None and config.mode != "ar":
            dec.draft_for(config.mode)  # built now: a draft that cannot be made fails the load, not a call
        return dec

    def draft_for(self, mode: str) -> SparrowDraft:
        """The draft a speculative mode runs: the loaded one, else a random draft of the mode's view
        (seed + 1, one per view, kept)."""
        if self.draft is not None:
            return self.draft
        view = views.view_for_mode(ENGINE_MODE[mode])
        if view not in self._random_drafts:
            draft = SparrowDraft(DraftConfig.for_target(self.target.cfg, visual_view=view),
                                 rngs=nnx.Rngs(self.seed + 1), dtype=self.dtype)
            if self.placement is not None:
                PL.place_model(draft, self.placement.replicated)
            self._random_drafts[view] = draft
        return self._random_drafts[view]

    def _config(self, config: DecodeConfig | None, overrides: Mapping) -> DecodeConfig:
        config = config or self.config
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(DecodeConfig)})
        if unknown:
            raise TypeError(f"unknown decode setting(s) {unknown}; DecodeConfig fields: "
                            f"{[f.name for f in dataclasses.fields(DecodeConfig)]}")
        return dataclasses.replace(config, **overrides) if overrides else config

    def _engine_config(self, config: DecodeConfig, tree: TreeSpec) -> E.EngineConfig:
        return E.EngineConfig(tree=tree, max_new_tokens=config.max_new_tokens,
                              eos_ids=tuple(self.target.cfg.eos_token_ids), impl=config.attention)

    def generate(self, prompts: str | Sequence[str], videos=None, images=None, *, config: DecodeConfig | None = None,
                 **overrides) -> list[GenerationOutput]:
        """Decode one batch: one row per prompt, each with its video or image (one entry per prompt,
        None for none; see Processor). Settings: `config` (default: the decoder's) with DecodeConfig
        field overrides, e.g. `max_new_tokens=64, mode="ar", sampling=SamplingParams(0.7, top_p=0.9)`."""
        config = self._config(config, overrides)
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        check_for_target({**config.settings(), "batch": len(texts)}, self.target.cfg)
        if isinstance(config.sampling, tuple) and len(config.sampling) != len(texts):
            raise ValueError(f"sampling: {len(config.sampling)} per-row settings for {len(texts)} prompt(s)")
        rows = self.processor(texts, videos, images, config.vision)
        self.processor.check_context(rows, config.max_new_tokens)
        run = self.run(rows, config)
        outs = []
        for b, text in enumerate(texts):
            ids = run.token_ids(b)
            answer = self.processor.codec.decode(ids)
            record = {**self.record(run, b), "row": b, "prompt": text, "tokens": ids, "text": answer,
                      "prompt_tokens": len(rows[b].input_ids), "visual_tokens": int(run.batch.vis_len_B[b])}
            outs.append(GenerationOutput(answer, ids, record))
        return outs

    def run(self, prompts, config: DecodeConfig | None = None, *, tree: TreeSpec | None = None,
            on_emit=None) -> Run:
        """Decode built prompts (Processor output) as one batch and time it: prefill (target, and the
        draft for speculative modes), then the jitted loop. `tree`: the resolved tree (default:
        `config.tree`, auto resolved); an AR run takes the speculative run's cache capacity from it, so
        the two are timed alike. `on_emit(tokens [B, L], counts [B])`: a host hook for streaming."""
        config = config or self.config
        if tree is None:
            tree, _ = resolve_tree(config.tree, self.draft_dir, prompts)
        ecfg = self._engine_config(config, tree)
        key = jax.random.key(config.seed)
        tcfg = self.target.cfg
        placement = self.place(config.mesh)
        if config.mode == "ar":
            m_star = config.m_star or tg.default_m_star(tcfg.num_layers)
            t0 = time.perf_counter()
            batch = registry.prepare_batch_for(tcfg)(prompts, tcfg)
            tg.check_context(batch, tcfg.text, config.max_new_tokens)
            capacity = cache_capacity(batch.input_ids_BT.shape[1], config.max_new_tokens, ecfg.cache_slack)
            pre = jax.block_until_ready(tg.prefill(self.tgraph, self.tparams, batch, capacity=capacity, m_star=m_star,
                                                   impl=ecfg.impl, placement=placement))
            t1 = time.perf_counter()
            res = jax.block_until_ready(ar_generate(
                self.tgraph, self.tparams, pre.cache, pre.last_logits_BV, pre.rope_delta_B, key,
                max_new_tokens=config.max_new_tokens, sampling=config.sampling, eos_ids=ecfg.eos_ids,
                impl=ecfg.impl, on_emit=on_emit, placement=placement))
            t2 = time.perf_counter()
            return Run(config, tree, m_star, np.asarray(res.tokens_BM), np.asarray(res.num_tokens_B), t1 - t0, t2 - t1,
                       batch)
        draft = self.draft_for(config.mode)
        m_star = config.m_star or draft.cfg.m_star or tg.default_m_star(tcfg.num_layers)
        dgraph, dparams = self._split_draft(draft)
        t0 = time.perf_counter()
        p = E.prepare(self.target, draft, prompts, ecfg, mode=ENGINE_MODE[config.mode],
                      keep_fraction=config.keep_fraction, prune_by=config.prune_by, m_star=config.m_star,
                      allow_view_mismatch=config.force_view, placement=placement,
                      split=((self.tgraph, self.tparams), (dgraph, dparams)))
        jax.block_until_ready((p.pre, p.dcache))
        t1 = time.perf_counter()
        res = jax.block_until_ready(E.speculative_generate(
            self.tgraph, self.tparams, dgraph, dparams, p.pre.cache, p.dcache, p.pre.last_logits_BV,
            p.pre.last_hidden_BD, p.pre.rope_delta_B, key, cfg=ecfg, sampling=config.sampling, on_emit=on_emit,
            placement=placement))
        t2 = time.perf_counter()
        return Run(config, tree, m_star, np.asarray(res.tokens_BM), np.asarray(res.num_tokens_B), t1 - t0, t2 - t1,
                   p.batch, np.asarray(res.accepted_BR), np.asarray(res.cut_BR))

    def profile_phases(self, prompts, config: DecodeConfig | None = None, *, tree: TreeSpec | None = None) -> dict:
        """Median seconds of one round's draft phase and verify phase (engine.profile_phases)."""
        config = config or self.config
        if tree is None:
            tree, _ = resolve_tree(config.tree, self.draft_dir, prompts)
        ecfg = self._engine_config(config, tree)
        draft = self.draft_for(config.mode)
        p = E.prepare(self.target, draft, prompts, ecfg, mode=ENGINE_MODE[config.mode],
                      keep_fraction=config.keep_fraction, prune_by=config.prune_by, m_star=config.m_star,
                      allow_view_mismatch=config.force_view)
        return E.profile_phases(self.target, draft, p, ecfg, sampling=config.sampling)

    def record(self, run: Run, row: int = 0) -> dict:
        """The metrics record of a run for one row (decode.py's JSON line without the row's text):
        mode, target, draft, tree, m*, batch, the row's sampling, timings (and how many XLA:CPU workers were
        pinned, `runtime`), τ and acceptance per depth (speculative runs, over the batch), the DecodeConfig."""
        spec, s = run.speculative, run.config.row_sampling(row)
        return {"mode": run.config.mode, "target": self.target_source, "draft": self.draft_source if spec else None,
                "tree": str(run.tree) if spec else None, "max_draft_tokens": run.tree.max_draft_tokens if spec else None,
                "m_star": run.m_star, "batch": int(run.tokens_BM.shape[0]), "temperature": s.temperature,
                "top_p": s.top_p, "top_k": s.top_k, "prefill_s": run.prefill_s, "decode_s": run.decode_s,
                "cpu_workers_pinned": self.cpu_workers_pinned, **run.acceptance(),
                "config": dataclasses.asdict(run.config)}

"""What `python decode.py` runs with no arguments: the shipped tiny target and its shipped Sparrow draft on
a held-out scene of the video world, asked for a detailed caption, with AR compared.

The sample is generated, not bundled: scene `SAMPLE_SEED` of the test split (never trained on), 8 s
(128 visual tokens) or with `--long` 1024 s (16k visual tokens, events spread to its end), rendered and
written as H.264 mp4 exactly as the world's training videos. decode.py then reads it like any user
video, with the target's own video_preprocessor_config.json (112 px, 2 fps). Whatever is missing falls
back with a message: no trained target -> a random-initialised configs/tiny.json (the answer is noise);
no shipped draft for the mode -> a random draft of the mode's view (lossless, rarely accepted).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

from sparrow_jax.synthetic import world as W

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_TARGET = ROOT / "shipped" / "tiny-qwen2.5-vl"
SHIPPED_DRAFTS = ROOT / "shipped" / "drafts"
DEFAULT_CONFIG = ROOT / "configs" / "tiny.json"
SAMPLE_SEED = W.split_seeds("test", 1)[0]
QUESTION = W.CAPTION_QUESTIONS[0]  # "Describe the video in detail."
SECONDS = {False: W.LENGTHS["short"], True: W.LENGTHS["16k"]}  # by --long
# Room for the caption: reference captions run to ~130 tokens at 8 s and ~280 at 1024 s (bench/world.py).
MAX_NEW_TOKENS = {False: 160, True: 320}
# Shipped draft directory names per decode mode (first found wins).
DRAFT_DIRS = {"sparrow": ("sparrow",), "full_visual": ("msd", "full_visual"), "ivsb_mid": ("ivsb_mid",),
              "pruned_visual": ("pruned_visual",)}


def has_weights(d) -> bool:
    d = Path(d)
    return (d / "config.json").is_file() and any(d.glob("*.safetensors"))


def shipped_target() -> Path | None:
    """The shipped tiny target's directory, if its trained weights are there."""
    return SHIPPED_TARGET if has_weights(SHIPPED_TARGET) else None


def shipped_draft(mode: str) -> Path | None:
    """The shipped draft for a decode mode (shipped/drafts/<name>/), if there is one."""
    for name in DRAFT_DIRS.get(mode, ()):
        if has_weights(SHIPPED_DRAFTS / name):
            return SHIPPED_DRAFTS / name
    return None


def world_config(preprocessor_json=SHIPPED_TARGET / "video_preprocessor_config.json") -> W.WorldConfig:
    """The world rendering that matches a target's video preprocessing (square frames of exactly its
    pixel budget, its sampling rate), so the video is read at the resolution it was rendered at, and the
    scene settings the target was trained on (`world.json` beside it, written by the target's export:
    sprite scale, objects on screen, events) so its demo scenes look like its training scenes."""
    d = json.loads(Path(preprocessor_json).read_text())
    side = int(round(d["max_pixels"] ** 0.5))
    if d.get("min_pixels") != d["max_pixels"] or side * side != d["max_pixels"]:
        raise ValueError(f"{preprocessor_json}: the world renders square frames of one size; min_pixels "
                         f"{d.get('min_pixels')} / max_pixels {d['max_pixels']} do not name one")
    cfg = W.WorldConfig(height=side, width=side, fps=float(d["fps"]), max_frames=int(d.get("max_frames", 768)))
    scene_file = Path(preprocessor_json).parent / W.WORLD_FILE
    return W.scene_settings_from(scene_file, cfg) if scene_file.is_file() else cfg


def target_world(target_dir) -> W.WorldConfig:
    """The world of a target directory: `world_config` of its video_preprocessor_config.json, or the
    default world for a directory without one (a random or foreign target)."""
    pre = Path(target_dir or "") / "video_preprocessor_config.json"
    return world_config(pre) if target_dir and pre.is_file() else W.WorldConfig()


@dataclasses.dataclass
class Sample:
    """The demo video (in a temporary directory that lives as long as this object) and its scene."""

    scene: W.Scene
    path: Path
    question: str
    tmp: tempfile.TemporaryDirectory

    def describe(self, cfg: W.WorldConfig) -> str:
        s = self.scene
        return (f"held-out world scene (test split, seed {s.seed}): {s.duration} s, {cfg.visual_tokens(s.duration)} "
                f"visual tokens, {len(s.objects)} objects, {len(s.events)} events")

    def score(self, answer: str) -> str:
        """The world scorer's verdict on a caption of this scene (components in [0, 1])."""
        sc = W.score_caption(self.scene, answer)
        parts = ", ".join(f"{k} {v:.2f}" for k, v in sc.items() if k != "overall")
        return f"caption score {sc['overall']:.2f} against the scene graph ({parts})"

    def truth(self) -> str:
        return W.caption(self.scene)


def make_sample(long: bool = False, preprocessor_json=SHIPPED_TARGET / "video_preprocessor_config.json") -> Sample:
    """Render the demo scene to an mp4 in a fresh temporary directory."""
    cfg = world_config(preprocessor_json)
    scene = W.make_scene(SAMPLE_SEED, SECONDS[long], cfg)
    tmp = tempfile.TemporaryDirectory(prefix="sparrow_demo_")
    path = W.write_scene_video(scene, Path(tmp.name) / f"world_test_{SAMPLE_SEED}_{scene.duration}s.mp4", cfg)
    return Sample(scene, path, QUESTION, tmp)


def resolve_defaults(args) -> tuple[Sample | None, list[str]]:
    """decode.py's defaults that depend on what ships (fills `args` in place). Without --target and
    --config: the shipped target, else a random configs/tiny.json. Without --draft, for the shipped
    target: its shipped draft of the mode. With no --prompt/--video/--image: the world sample video
    and caption request, --compare-ar on, room for a caption, one timed run with --long. Returns
    (the sample or None, notes to print)."""
    notes = []
    if args.target is None and args.config is None:
        if shipped_target():
            args.target = str(SHIPPED_TARGET)
        else:
            args.config = str(DEFAULT_CONFIG)
            if args.tokenizer is None and (SHIPPED_TARGET / "tokenizer.json").is_file():
                args.tokenizer = str(SHIPPED_TARGET)
            notes.append(f"no trained weights in {SHIPPED_TARGET} (model.safetensors): running a random-initialised "
                         f"target of {DEFAULT_CONFIG.relative_to(ROOT)} — its answer is noise. Train the shipped one "
                         "with: bash scripts/train_reading_target.sh (then scripts/build_shipped.sh copies it there)")
    is_shipped = args.target is not None and Path(args.target).resolve() == SHIPPED_TARGET.resolve()
    if args.draft is None and args.mode != "ar" and is_shipped:
        found = shipped_draft(args.mode)
        if found:
            args.draft = str(found)
        else:
            notes.append(f"no shipped draft for --mode {args.mode} in {SHIPPED_DRAFTS}: using a random draft of the "
                         "mode's view (the output is still exactly the target's; few drafts are accepted)")
    sample = None
    if not (args.prompt or args.video or args.image):
        sample = make_sample(args.long)
        args.video, args.prompt = [str(sample.path)], [sample.question]
        if not is_shipped and args.target is None:  # a random target: read the video as the shipped one would
            wcfg = world_config()
            args.fps = args.fps or wcfg.fps
            args.max_frames = args.max_frames or wcfg.max_frames
            args.min_pixels = args.min_pixels or wcfg.height * wcfg.width
            args.max_pixels = args.max_pixels or wcfg.height * wcfg.width
        notes.append(f"no inputs given: {sample.describe(world_config())}, written to {sample.path.name}; "
                     f"question {sample.question!r}")
    elif args.long:
        notes.append("--long picks the demo video; it is ignored with --prompt/--video/--image")
    if args.compare_ar is None:
        args.compare_ar = sample is not None and args.mode != "ar"
    if args.max_new_tokens is None:
        args.max_new_tokens = MAX_NEW_TOKENS[bool(args.long)] if sample is not None else 32
    if args.repeats is None:
        args.repeats = 1 if sample is not None and args.long else 3
    return sample, notes

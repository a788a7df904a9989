"""The shipped tiny video world (SPEC §7): seeded scene graphs, fast rendering, mp4, captions, QA, a scorer.

A *scene* is a small graph over time: coloured shapes (unique colour+shape per scene, small or large)
that move left/right/up/down (wrapping around the frame), bounce, or stand still; some are on screen at
the start, others enter or leave at whole seconds; the background colour and the lighting change at
whole seconds too. Event times are stratified over the whole video and the last one always falls in its
final quarter, so a long video's answers depend on what happens late in it.

Everything is derived from the scene graph: frames (`render`), mp4 (`write_scene_video`), a detailed
caption in several phrasings (`caption`), question/answer pairs (`scene_qa`) and the scorer
(`score_caption`, `score_answer`) that checks generated text against the graph, component by component
(colours, shapes, sizes, motions, counts, events, their order and times). Samples for the target's chat
format come from `scene_sample`; frames take the same sampling + preprocessing path as inference
(`visual_from_frames` == `preprocess_video` on the written mp4), optionally through an in-memory codec
round trip so training sees exactly what a model reading the file sees.

Token arithmetic (Qwen2.5-VL: patch 14, merge 2, temporal patch 2): visual tokens =
(frames / 2) * (H / 28) * (W / 28). At the defaults (112 x 112, 2 fps) that is 16 tokens per second of
video; `LENGTHS` names the durations for 0.5k ... 25k tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sparrow_jax.io.text import QWEN_ASSISTANT_PREFIX, QWEN_USER_PREFIX, load_codec
from sparrow_jax.io.vision_inputs import (VisionPreprocessConfig, VisionTokenIds, VisualInput,
                                          build_multimodal_prompt, preprocess_frames, sample_frame_indices)
from sparrow_jax.synthetic.video import codec_roundtrip, write_video
from sparrow_jax.training.data import Sample

# the shipped tiny target (its tokenizer is the world's; `synthetic.tokenizer` writes it there)
SHIPPED_DIR = Path(__file__).resolve().parents[2] / "shipped" / "tiny-qwen2.5-vl"

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 235), "yellow": (235, 215, 40),
           "white": (245, 245, 245), "purple": (160, 60, 210), "orange": (245, 140, 20), "cyan": (40, 215, 225)}
SHAPES = ("square", "circle", "triangle", "diamond", "cross")
SIZES = {"small": 0.2, "large": 0.32}  # sprite side as a fraction of min(H, W): a small one spans about one merged visual token (28 px of 112)
MOTIONS = ("left", "right", "up", "down", "still", "bounce")
BACKGROUNDS = {"black": (12, 12, 12), "grey": (105, 105, 105), "navy": (18, 28, 95), "brown": (95, 58, 28)}
LIGHTING = {"bright": 1.0, "dim": 0.45}
EVENT_KINDS = ("enter", "exit", "background", "lights")

# Named lengths at the default config (16 visual tokens per second): name -> seconds.
MIN_DURATION = 4  # seconds: room for events spread over the clip
LENGTHS = {"short": 8, "0.5k": 32, "1.5k": 96, "4k": 256, "8k": 512, "16k": 1024, "25k": 1600}

SPLITS = {"train": (0, 10_000_000), "validation": (10_000_000, 10_100_000), "test": (20_000_000, 20_100_000)}

# One encoder thread: x264 output (and so the decoded frames) is then bit-identical run to run.
VIDEO_CODEC, VIDEO_OPTIONS = "libx264", {"crf": "18", "preset": "veryfast", "threads": "1"}


# ------------------------------------------------------------------------------------------ config


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Rendering and generation settings. H and W must be multiples of 28 (one merged visual token)."""

    height: int = 112
    width: int = 112
    fps: float = 2.0
    max_visible: int = 4  # objects on screen at once
    max_events: int = 14  # 0: a static scene (no entrances, exits, background or lighting changes)
    speed: tuple[float, float] = (0.06, 0.14)  # frame sizes per second
    max_frames: int = 8192  # frame-sampling cap of the preprocessing (HF's default 768 is too few here)
    sprite_scale: float = 1.0  # sprite sides = SIZES x this (> 1: objects span several visual tokens; a curriculum)

    def __post_init__(self):
        if self.height % 28 or self.width % 28 or min(self.height, self.width) <= 0:
            raise ValueError(f"WorldConfig height/width must be positive multiples of 28, got {self.height}x{self.width}")
        if self.fps <= 0:
            raise ValueError(f"WorldConfig.fps must be positive, got {self.fps}")
        if self.max_events < 0 or self.max_visible < 1:
            raise ValueError(f"WorldConfig needs max_events >= 0 and max_visible >= 1, got {self.max_events}, "
                             f"{self.max_visible}")
        if not 0 < self.sprite_scale * max(SIZES.values()) <= 1:
            raise ValueError(f"WorldConfig.sprite_scale must be in (0, {1 / max(SIZES.values()):.3g}], got {self.sprite_scale}")

    def num_frames(self, duration: float) -> int:
        """Frames rendered for `duration` seconds (even, so every temporal patch holds two real frames)."""
        n = int(round(duration * self.fps))
        return max(2, n - n % 2)

    def sampled_frames(self, duration: float) -> int:
        """Frames the preprocessing keeps of a `duration`-second video: all of them up to `max_frames`,
        then evenly spread (a longer video at a lower rate, its positions still spanning its length)."""
        return len(sample_frame_indices(self.num_frames(duration), self.fps, self.vision_config()))

    def visual_tokens(self, duration: float) -> int:
        """Qwen2.5-VL placeholder tokens of a `duration`-second video: (kept frames/2) * (H/28) * (W/28)."""
        return self.sampled_frames(duration) // 2 * (self.height // 28) * (self.width // 28)

    def duration_for_tokens(self, tokens: int) -> int:
        """Shortest whole-second duration with at least `tokens` visual tokens."""
        per_second = self.fps / 2 * (self.height // 28) * (self.width // 28)
        d = max(1, math.ceil(tokens / per_second))
        while self.visual_tokens(d) < tokens:
            if self.sampled_frames(d) < self.num_frames(d):  # capped: longer videos get no more tokens
                raise ValueError(f"WorldConfig.max_frames {self.max_frames} caps a video at "
                                 f"{self.visual_tokens(d)} visual tokens, fewer than the {tokens} asked for")
            d += 1
        return d

    def vision_config(self) -> VisionPreprocessConfig:
        """Preprocessing that keeps the rendered resolution and every rendered frame."""
        return VisionPreprocessConfig(min_pixels=self.height * self.width, max_pixels=self.height * self.width,
                                      fps=self.fps, max_frames=self.max_frames)


# Beside a target trained on the world: the scene settings it was trained on (rendering size and frame
# rate live in its video_preprocessor_config.json).
WORLD_FILE = "world.json"
SCENE_FIELDS = ("max_visible", "max_events", "speed", "sprite_scale")


def save_scene_settings(out_dir, cfg: WorldConfig) -> Path:
    """Write `cfg`'s scene settings (SCENE_FIELDS) as out_dir/world.json."""
    d = {k: getattr(cfg, k) for k in SCENE_FIELDS}
    path = Path(out_dir) / WORLD_FILE
    path.write_text(json.dumps(d, indent=2) + "\n")
    return path


def scene_settings_from(path, base: WorldConfig = WorldConfig()) -> WorldConfig:
    """`base` with the scene settings of a world.json; an unknown or invalid field names the file."""
    d = json.loads(Path(path).read_text())
    unknown = set(d) - set(SCENE_FIELDS)
    if unknown:
        raise ValueError(f"{path}: unknown world settings {sorted(unknown)} (known: {list(SCENE_FIELDS)})")
    if "speed" in d:
        d["speed"] = tuple(d["speed"])
    try:
        return dataclasses.replace(base, **d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


# ------------------------------------------------------------------------------------- scene graph


@dataclasses.dataclass(frozen=True)
class WorldObject:
    colour: str
    shape: str
    size: str  # "small" | "large"
    motion: str  # one of MOTIONS
    start: tuple[float, float]  # (y, x) centre in [0, 1] when it enters
    velocity: tuple[float, float]  # (dy, dx) frame sizes per second
    t_in: int  # seconds; 0 = on screen from the start
    t_out: int  # seconds; == duration if it stays to the end

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclasses.dataclass(frozen=True)
class Event:
    time: int  # whole seconds, distinct within a scene
    kind: str  # one of EVENT_KINDS
    value: str  # enter/exit: object name; background: colour; lights: "dim" | "bright"


@dataclasses.dataclass(frozen=True)
class Scene:
    seed: int
    duration: int  # seconds
    objects: tuple[WorldObject, ...]
    background: str  # at t = 0 (lighting starts bright)
    events: tuple[Event, ...]  # sorted by time

    def obj(self, name: str) -> WorldObject:
        return next(o for o in self.objects if o.name == name)

    def visible(self, t: float) -> list[WorldObject]:
        """Objects on screen at time t (t = duration: those that stay to the end)."""
        return [o for o in self.objects if o.t_in <= t < o.t_out or o.t_out == t == self.duration]

    def background_at(self, t: float) -> str:
        bg = self.background
        for e in self.events:
            if e.kind == "background" and e.time <= t:
                bg = e.value
        return bg

    def lighting_at(self, t: float) -> str:
        light = "bright"
        for e in self.events:
            if e.kind == "lights" and e.time <= t:
                light = e.value
        return light

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def split_seeds(split: str, n: int, offset: int = 0) -> range:
    """`n` scene seeds of a split (train / validation / test), disjoint by construction."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    lo, hi = SPLITS[split]
    if offset < 0 or lo + offset + n > hi:
        raise ValueError(f"split {split!r} holds {hi - lo} seeds; asked for [{offset}, {offset + n})")
    return range(lo + offset, lo + offset + n)


def _event_times(rng, duration: int, n: int) -> list[int]:
    """n distinct whole seconds in [1, duration-1], one per equal stratum (spread over the whole video)."""
    if n == 0:
        return []
    w = (duration - 1) / n
    lows = [1 + math.floor(i * w) for i in range(n)]
    lows[-1] = max(lows[-1], math.ceil(0.75 * duration))  # the last event falls in the final quarter
    return [int(rng.integers(lo, 1 + math.floor((i + 1) * w))) for i, lo in enumerate(lows)]


def make_scene(seed: int, duration: int, cfg: WorldConfig = WorldConfig()) -> Scene:
    """The scene of (`seed`, `duration`): deterministic, independent across durations."""
    duration = int(duration)
    if duration < MIN_DURATION:
        raise ValueError(f"scene duration must be at least {MIN_DURATION} seconds, got {duration}")
    rng = np.random.default_rng([int(seed), duration])
    combos = list(itertools.product(COLOURS, SHAPES))
    order = rng.permutation(len(combos))
    fresh = iter(combos[i] for i in order)
    lo_v, hi_v = cfg.speed

    def new_object(t_in: int) -> dict:
        colour, shape = next(fresh)
        motion = MOTIONS[rng.integers(len(MOTIONS))]
        speed = rng.uniform(lo_v, hi_v)
        velocity = {"left": (0.0, -speed), "right": (0.0, speed), "up": (-speed, 0.0), "down": (speed, 0.0),
                    "still": (0.0, 0.0)}.get(motion)
        if velocity is None:  # bounce: a diagonal heading
            sy, sx = rng.choice([-1.0, 1.0], 2)
            velocity = (sy * speed * 0.8, sx * speed)
        size = ("small", "large")[rng.integers(2)]
        return dict(colour=colour, shape=shape, size=size, motion=motion,
                    start=tuple(float(v) for v in rng.uniform(0.15, 0.85, 2)),
                    velocity=tuple(float(v) for v in velocity), t_in=t_in, t_out=duration)

    n_init = int(rng.integers(1, min(3, cfg.max_visible) + 1))
    objects = [new_object(0) for _ in range(n_init)]
    visible = list(range(n_init))
    scale = max(0, round(2 * math.log2(duration / 8))) if duration > 8 else 0
    n_events = min(duration - 1, cfg.max_events, int(rng.integers(2, 5)) + scale)
    background, light = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))], "bright"
    events = []
    # (kind, value) stays unique within a scene (each background colour is changed to once, the lights
    # dim and brighten once), so every event is named by what happens and questions are unambiguous.
    used_bg = {background}
    for t in _event_times(rng, duration, n_events):
        n_light = sum(e.kind == "lights" for e in events)
        weights = np.array([0.35 * (len(visible) < cfg.max_visible), 0.25 * (len(visible) >= 2),
                            0.2 * (len(used_bg) < len(BACKGROUNDS)), 0.2 * (n_light < 2)])
        kind = EVENT_KINDS[rng.choice(4, p=weights / weights.sum())]
        if kind == "enter":
            objects.append(new_object(t))
            visible.append(len(objects) - 1)
            value = "{colour} {shape}".format(**objects[-1])
        elif kind == "exit":
            i = visible.pop(int(rng.integers(len(visible))))
            objects[i]["t_out"] = t
            value = "{colour} {shape}".format(**objects[i])
        elif kind == "background":
            free = [c for c in BACKGROUNDS if c not in used_bg]
            value = free[rng.integers(len(free))]
            used_bg.add(value)
        else:
            light = value = "dim" if light == "bright" else "bright"
        events.append(Event(t, kind, value))
    return Scene(int(seed), duration, tuple(WorldObject(**o) for o in objects), background, tuple(events))


# --------------------------------------------------------------------------------------- rendering


def _sprite_offsets(shape: str, side: int) -> tuple[np.ndarray, np.ndarray]:
    """(dy, dx) pixel offsets from the centre covered by a shape of `side` pixels."""
    r = (side - 1) / 2
    y, x = np.mgrid[0:side, 0:side] - r
    h = side / 2
    m = {"square": np.ones_like(x, bool),
         "circle": x * x + y * y <= h * h,
         "triangle": np.abs(x) <= (y + h) / 2 + 0.5,
         "diamond": np.abs(x) + np.abs(y) <= h + 0.25,
         "cross": (np.abs(x) <= side / 6 + 0.25) | (np.abs(y) <= side / 6 + 0.25)}[shape]
    dy, dx = np.nonzero(m)
    return dy - side // 2, dx - side // 2


def _centres(o: WorldObject, t_n: np.ndarray, half: float) -> np.ndarray:
    """[n, 2] (y, x) centres in [0, 1] at times t_n; wrap for straight motions, reflect for bounce."""
    p = np.asarray(o.start) + np.asarray(o.velocity) * (t_n - o.t_in)[:, None]
    if o.motion != "bounce":
        return p % 1.0
    lo, span = half, 1.0 - 2 * half  # reflect the unbounded path into [half, 1 - half]
    q = (p - lo) % (2 * span)
    return lo + np.where(q > span, 2 * span - q, q)


def render(scene: Scene, cfg: WorldConfig = WorldConfig()) -> np.ndarray:
    """uint8 [T, H, W, 3] frames of the scene (T = cfg.num_frames(duration)); vectorised per object."""
    H, W = cfg.height, cfg.width
    T = cfg.num_frames(scene.duration)
    t_T = np.arange(T) / cfg.fps
    bg_idx = {c: i for i, c in enumerate(BACKGROUNDS)}
    bg_T = np.full(T, bg_idx[scene.background])
    light_T = np.ones(T)
    for e in scene.events:
        if e.kind == "background":
            bg_T[t_T >= e.time] = bg_idx[e.value]
        elif e.kind == "lights":
            light_T[t_T >= e.time] = LIGHTING[e.value]
    frames = np.empty((T, H, W, 3), np.uint8)
    frames[:] = (np.asarray(list(BACKGROUNDS.values()))[bg_T] * light_T[:, None]).astype(np.uint8)[:, None, None]
    base = min(H, W)
    # Large objects first so small ones stay visible where they overlap.
    for o in sorted(scene.objects, key=lambda o: o.size != "large"):
        t_n = np.nonzero((t_T >= o.t_in) & (t_T < o.t_out))[0]
        if not t_n.size:
            continue
        side = max(3, round(SIZES[o.size] * cfg.sprite_scale * base))
        dy_K, dx_K = _sprite_offsets(o.shape, side)
        c_n2 = _centres(o, t_T[t_n], side / 2 / base)
        y_nK = (np.rint(c_n2[:, :1] * H).astype(np.int64) + dy_K) % H
        x_nK = (np.rint(c_n2[:, 1:] * W).astype(np.int64) + dx_K) % W
        colour_n3 = (np.asarray(COLOURS[o.colour]) * light_T[t_n, None]).astype(np.uint8)
        frames[t_n[:, None], y_nK, x_nK] = colour_n3[:, None, :]
    return frames


def ablate(frames_THW3: np.ndarray, mode: str, seed: int = 0, temporal_patch: int = 2) -> np.ndarray:
    """Control videos for "does the model read the video": 'real' (as is), 'blank' (all black), or
    'shuffled' (temporal patches in a random order: each still looks real, their order is lost)."""
    if mode == "real":
        return frames_THW3
    if mode == "blank":
        return np.zeros_like(frames_THW3)
    if mode == "shuffled":
        T = frames_THW3.shape[0]
        perm = np.random.default_rng(seed).permutation(-(-T // temporal_patch))
        return frames_THW3[np.concatenate([np.arange(g * temporal_patch, min(T, (g + 1) * temporal_patch))
                                           for g in perm])]
    raise ValueError(f"unknown ablation {mode!r}; expected 'real', 'blank' or 'shuffled'")


def write_scene_video(scene: Scene, path, cfg: WorldConfig = WorldConfig(), frames=None) -> Path:
    """The scene (or given frames) as an H.264 mp4 at cfg.fps."""
    return write_video(path, render(scene, cfg) if frames is None else frames, cfg.fps, VIDEO_CODEC, VIDEO_OPTIONS)


def visual_from_frames(frames_THW3: np.ndarray, cfg: WorldConfig = WorldConfig(), *,
                       roundtrip: bool = False) -> VisualInput:
    """Frames -> VisualInput by the path inference takes for the mp4 (`read_video`'s frame sampling and
    seconds per grid step, then `preprocess_frames`); `roundtrip` first passes them through the codec."""
    if roundtrip:
        frames_THW3 = codec_roundtrip(frames_THW3, cfg.fps, VIDEO_CODEC, VIDEO_OPTIONS)
    vcfg = cfg.vision_config()
    T = frames_THW3.shape[0]
    idx = sample_frame_indices(T, cfg.fps, vcfg)
    sampled_fps = len(idx) / T * cfg.fps
    return preprocess_frames(frames_THW3[idx], vcfg, second_per_grid_t=vcfg.temporal_patch_size / sampled_fps)


# ----------------------------------------------------------------------------------------- language

_NUM_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
              "twelve")
_MOTION_TEXT = {
    "left": ("moving left", "drifting to the left", "sliding left", "heading left"),
    "right": ("moving right", "drifting to the right", "sliding right", "heading right"),
    "up": ("moving up", "rising", "drifting upward", "heading up"),
    "down": ("moving down", "sinking", "drifting downward", "heading down"),
    "still": ("standing still", "not moving", "staying in place", "motionless"),
    "bounce": ("bouncing around", "bouncing off the edges", "bouncing from wall to wall"),
}
_MOTION_ANSWER = {"left": "It moves to the left.", "right": "It moves to the right.", "up": "It moves up.",
                  "down": "It moves down.", "still": "It does not move; it stays still.",
                  "bounce": "It bounces around the frame."}
# The words of the world's language that carry a scene fact (what a caption can only get right by reading
# the video): attribute names, number words, and the motion words of the texts above.
MOTION_WORDS = frozenset({*MOTIONS, "bounces", "bouncing", "stays"})
ATTRIBUTE_WORDS = frozenset({*COLOURS, *SHAPES, *SIZES, *BACKGROUNDS, *_NUM_WORDS[1:], *MOTION_WORDS})


def _num(n: int, rng) -> str:
    return _NUM_WORDS[n] if n < len(_NUM_WORDS) and rng.random() < 0.8 else str(n)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _a(o: WorldObject) -> str:
    return f"a {o.size} {o.name}"


def _secs(t: int) -> str:
    return f"{t} second" if t == 1 else f"{t} seconds"


def _motion(o: WorldObject, rng) -> str:
    choices = _MOTION_TEXT[o.motion]
    return choices[rng.integers(len(choices))]


def _listing(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _pick(rng, *templates: str) -> str:
    return templates[rng.integers(len(templates))]


def _at(t: int, rng) -> str:
    return _pick(rng, f"At {_secs(t)}", f"At second {t}", f"After {_secs(t)}", f"{_secs(t)} in")


def event_sentence(scene: Scene, e: Event, rng) -> str:
    """One sentence for one event (the scorer reads exactly one event per sentence)."""
    at = _at(e.time, rng)
    if e.kind == "enter":
        o = scene.obj(e.value)
        verb = _pick(rng, "appears", "enters", "comes into view", "arrives")
        return f"{at}, {_a(o)} {verb}, {_motion(o, rng)}."
    if e.kind == "exit":
        verb = _pick(rng, "disappears", "leaves the scene", "vanishes", "exits")
        return f"{at}, the {e.value} {verb}."
    if e.kind == "background":
        verb = _pick(rng, "turns", "changes to", "becomes", "switches to")
        return f"{at}, the background {verb} {e.value}."
    if e.value == "dim":
        return f"{at}, " + _pick(rng, "the lights dim.", "the scene gets darker.", "the lighting dims.")
    return f"{at}, " + _pick(rng, "the lights brighten again.", "the scene gets brighter.", "the lighting brightens.")


def caption(scene: Scene, variant: int = 0) -> str:
    """A detailed caption; `variant` picks the phrasing (every variant states the same facts)."""
    rng = np.random.default_rng([scene.seed, scene.duration, variant, 7])
    D, start, end = scene.duration, scene.visible(0), scene.visible(scene.duration)
    intro = _pick(rng, f"The video lasts {D} seconds and is set on a {scene.background} background.",
                  f"This clip is {D} seconds long, with a {scene.background} background.",
                  f"{'An' if str(D)[0] == '8' or D in (11, 18) else 'A'} {D}-second video on a {scene.background} background.")
    parts = [f"{_a(o)} {_motion(o, rng)}" for o in start]
    n = _num(len(start), rng)
    noun = "object" if len(start) == 1 else "objects"
    opening = _pick(rng, f"It opens with {n} {noun} on screen: {_listing(parts)}.",
                    f"At the start there {'is' if len(start) == 1 else 'are'} {n} {noun}: {_listing(parts)}.",
                    f"In the beginning {n} {noun} {'is' if len(start) == 1 else 'are'} visible: {_listing(parts)}.")
    sentences = [intro, opening] + [event_sentence(scene, e, rng) for e in scene.events]
    names = _listing([f"the {o.name}" for o in end]) if end else ""
    n, noun = _num(len(end), rng), "object" if len(end) == 1 else "objects"
    if end:
        sentences.append(_pick(rng, f"At the end, {n} {noun} {'remains' if len(end) == 1 else 'remain'}: {names}.",
                               f"By the end of the video, {n} {noun} {'is' if len(end) == 1 else 'are'} on screen: {names}."))
    total = len(scene.objects)
    sentences.append(_pick(rng, f"In total, {_num(total, rng)} different {'object is' if total == 1 else 'objects are'} seen.",
                           f"Altogether {_num(total, rng)} different {'object takes' if total == 1 else 'objects take'} part."))
    return " ".join(sentences)


QA_KINDS = ("caption", "count", "colour", "shape", "size", "motion", "time", "object", "yesno",
            "background", "event")


@dataclasses.dataclass(frozen=True)
class QA:
    question: str
    answer: str
    kind: str  # how score_answer reads the answer: caption/count/colour/shape/size/motion/time/object/yesno/background/event
    value: object  # the canonical answer


CAPTION_QUESTIONS = ("Describe the video in detail.", "What happens in this video?",
                     "Give a detailed description of the video.", "Describe everything that happens in the clip.")


def scene_qa(scene: Scene, variant: int = 0) -> list[QA]:
    """Every question this scene supports (attributes, counts, order of events, time), with answers."""
    rng = np.random.default_rng([scene.seed, scene.duration, variant, 11])
    D, objs = scene.duration, scene.objects
    out = [QA(CAPTION_QUESTIONS[rng.integers(len(CAPTION_QUESTIONS))], caption(scene, variant), "caption", None)]
    total, start, end = len(objs), scene.visible(0), scene.visible(D)

    def count_qa(q, n, where):
        noun = "object" if n == 1 else "objects"
        ans = f"{_num(n, rng).capitalize()} {noun}{where}." if n else "None."
        out.append(QA(q, ans, "count", n))

    count_qa("How many different objects appear in the video?", total, "")
    count_qa("How many objects are on screen at the start?", len(start), " at the start")
    count_qa("How many objects are on screen at the end of the video?", len(end), " at the end")
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    count_qa(f"How many {colour} objects appear in the video?", sum(o.colour == colour for o in objs), "")
    for o in objs:
        if sum(p.shape == o.shape for p in objs) == 1:
            out.append(QA(f"What colour is the {o.shape}?", f"The {o.shape} is {o.colour}.", "colour", o.colour))
        if sum(p.colour == o.colour for p in objs) == 1:
            out.append(QA(f"What shape is the {o.colour} object?", f"It is {_article(o.shape)} {o.shape}.", "shape", o.shape))
        out.append(QA(f"Is the {o.name} small or large?", f"It is {o.size}.", "size", o.size))
        out.append(QA(f"How does the {o.name} move?", _MOTION_ANSWER[o.motion], "motion", o.motion))
        if o.t_in > 0:
            out.append(QA(f"When does the {o.name} appear?", f"It appears at {_secs(o.t_in)}.", "time", o.t_in))
        if o.t_out < D:
            out.append(QA(f"When does the {o.name} leave?", f"It leaves at {_secs(o.t_out)}.", "time", o.t_out))
    entered = [e for e in scene.events if e.kind == "enter"]
    if len(entered) >= 2:
        a, b = rng.choice(len(entered), 2, replace=False)
        first = entered[min(a, b)].value
        out.append(QA(f"Which appears first, the {entered[a].value} or the {entered[b].value}?",
                      f"The {first} appears first.", "object", first))
    if entered:
        out.append(QA("Which object is the last to appear?", f"The {entered[-1].value}.", "object", entered[-1].value))
    absent = [f"{c} {s}" for c, s in itertools.product(COLOURS, SHAPES) if f"{c} {s}" not in {o.name for o in objs}]
    yes, no = objs[rng.integers(total)].name, absent[rng.integers(len(absent))]
    out.append(QA(f"Is there {_article(yes)} {yes} in the video?", "Yes.", "yesno", "yes"))
    out.append(QA(f"Is there {_article(no)} {no} in the video?", "No.", "yesno", "no"))
    out.append(QA("What colour is the background at the end of the video?",
                  f"At the end the background is {scene.background_at(D)}.", "background", scene.background_at(D)))
    t = int(rng.integers(0, D))
    out.append(QA(f"What colour is the background at {_secs(t)}?",
                  f"The background is {scene.background_at(t)}.", "background", scene.background_at(t)))
    if scene.events:  # a static scene (max_events=0) has no event questions
        last = scene.events[-1]
        out.append(QA("What is the last thing that happens in the video?", event_sentence(scene, last, rng),
                      "event", (last.kind, last.value)))
        e = scene.events[rng.integers(len(scene.events))]
        out.append(QA(f"What happens at {_secs(e.time)}?", event_sentence(scene, e, rng), "event", (e.kind, e.value)))
        for e in scene.events:
            if e.kind == "background":
                out.append(QA(f"When does the background change to {e.value}?", f"At {_secs(e.time)}.", "time", e.time))
            elif e.kind == "lights":
                verb = "dim" if e.value == "dim" else "brighten"
                out.append(QA(f"When do the lights {verb}?", f"At {_secs(e.time)}.", "time", e.time))
    return out


# -------------------------------------------------------------------------------------------- scorer

_N = "|".join(_NUM_WORDS)
_OBJ_RE = re.compile(r"\b(?:(small|large|little|big|tiny)\s+)?(" + "|".join(COLOURS) + r")\s+(" +
                     "|".join(SHAPES) + r")(?:e?s)?\b", re.I)
_MOTION_RE = {
    "left": r"\bleft(?:wards?)?\b", "right": r"\bright(?:wards?)?\b",
    "up": r"\bup(?:wards?)?\b|\bris(?:es|ing)\b", "down": r"\bdown(?:wards?)?\b|\bsink(?:s|ing)\b|\bfall(?:s|ing)\b",
    "still": r"\bstill\b|\bnot moving\b|\bmotionless\b|\bstationary\b|\bin place\b|\bdoes not move\b",
    "bounce": r"\bbounc\w*",
}
_SIZE_WORD = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large"}
_ENTER_RE = re.compile(r"\b(?:appears?|enters?|comes into view|arrives?)\b", re.I)
_EXIT_RE = re.compile(r"\b(?:disappears?|leaves?|vanish(?:es)?|exits?)\b", re.I)
_BG_CHANGE_RE = re.compile(r"\bbackground\s+(?:turns|changes to|becomes|switches to)\s+(" + "|".join(BACKGROUNDS) + r")\b", re.I)
_BG_RE = re.compile(r"\b(" + "|".join(BACKGROUNDS) + r")\s+background\b|\bbackground is (" + "|".join(BACKGROUNDS) + r")\b", re.I)
_DIM_RE = re.compile(r"\b(?:dims?|darker|darkens)\b", re.I)
_BRIGHT_RE = re.compile(r"\b(?:brighten\w*|brighter)\b", re.I)
_TIME_RE = re.compile(r"\b(?:at|after)\s+(?:second\s+)?(\d+)(?:\s+seconds?)?\b|\b(\d+)\s+seconds?\s+in\b", re.I)
_COUNT_RE = re.compile(r"\b(\d+|" + _N + r")\s+(?:different\s+)?(?:objects?|shapes?)\b", re.I)
_DURATION_RE = re.compile(r"\b(\d+)(?:-second\b|\s+seconds\s+long\b)|\blasts\s+(\d+)\s+seconds\b", re.I)


def _to_int(word: str) -> int:
    w = word.lower()
    return int(w) if w.isdigit() else _NUM_WORDS.index(w)


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def _mentions(sentence: str) -> list[tuple[int, str, str | None]]:
    """(offset, 'colour shape', size or None) for each object mention in a sentence."""
    return [(m.start(), f"{m.group(2).lower()} {m.group(3).lower()}",
             _SIZE_WORD[m.group(1).lower()] if m.group(1) else None) for m in _OBJ_RE.finditer(sentence)]


def _motions(sentence: str) -> list[tuple[int, str]]:
    return sorted((m.start(), k) for k, pat in _MOTION_RE.items() for m in re.finditer(pat, sentence, re.I))


def parse_text(text: str) -> dict:
    """Facts stated by a caption/answer: object mentions with sizes and motions, counts, events (in text
    order, with times), background colours, duration."""
    facts = {"objects": {}, "sizes": [], "motions": [], "counts": [], "events": [], "backgrounds": [], "duration": None}
    for s in _sentences(text):
        ments, moves = _mentions(s), _motions(s)
        for k, (pos, name, size) in enumerate(ments):
            facts["objects"][name] = True
            if size:
                facts["sizes"].append((name, size))
            nxt = ments[k + 1][0] if k + 1 < len(ments) else len(s)
            mv = [m for p, m in moves if pos < p < nxt]
            if mv:
                facts["motions"].append((name, mv[0]))
        for m in _BG_RE.finditer(s):
            facts["backgrounds"].append((m.group(1) or m.group(2)).lower())
        low = s.lower()
        if m := _COUNT_RE.search(s):
            where = ("total" if re.search(r"\b(?:total|altogether|overall|different)\b", low) else
                     "end" if re.search(r"\b(?:end|final|finally)\b", low) else
                     "start" if re.search(r"\b(?:start|opens?|beginning|begins?|first)\b", low) else None)
            if where:
                facts["counts"].append((where, _to_int(m.group(1))))
        if m := _DURATION_RE.search(s):
            facts["duration"] = int(m.group(1) or m.group(2))
            continue
        tm = _TIME_RE.search(s)
        if not tm:
            continue
        t = int(tm.group(1) or tm.group(2))
        if bg := _BG_CHANGE_RE.search(s):
            facts["events"].append(("background", bg.group(1).lower(), t))
            facts["backgrounds"].append(bg.group(1).lower())
        elif ments and _ENTER_RE.search(s):
            facts["events"].append(("enter", ments[0][1], t))
        elif ments and _EXIT_RE.search(s):
            facts["events"].append(("exit", ments[0][1], t))
        elif re.search(r"\blight|\bscene gets\b", low) and (_DIM_RE.search(s) or _BRIGHT_RE.search(s)):
            facts["events"].append(("lights", "dim" if _DIM_RE.search(s) else "bright", t))
    return facts


# Well-formedness: the scorer reads facts wherever they occur, so a degenerate caption ("In screen: a screen: a
# screen: the video, one in1 object remains square part.") can still score well. A clause is well formed if,
# with its attribute words and numbers masked, it is a clause the caption generator writes.
_FORM_SPLIT = re.compile(r"\s*(?:[.:,;!?]|\band\b)\s*")
_FORM_WORD = re.compile(r"\b(?:" + "|".join([*COLOURS, *BACKGROUNDS, *SIZES, *_SIZE_WORD, *_NUM_WORDS]) + r"|"
                        + "|".join(SHAPES) + r")(?:e?s)?\b|\d+")


def _clause_forms(text: str) -> list[str]:
    return [" ".join(_FORM_WORD.sub("#", c.lower()).split()) for c in _FORM_SPLIT.split(text) if c.strip()]


@functools.lru_cache(maxsize=1)
def caption_clause_forms(scenes: int = 400) -> frozenset:
    """The masked clauses of the world's captions (default world: events, several objects, every phrasing)."""
    return frozenset(f for seed in range(scenes) for d in (8, 64) for v in range(3)
                     for f in _clause_forms(caption(make_scene(seed, d), v)))


def well_formed(text: str) -> float:
    """Share of the text's clauses that are clauses of the world's captions (0 for no text)."""
    forms = _clause_forms(text)
    return float(np.mean([f in caption_clause_forms() for f in forms])) if forms else 0.0


def _f1(pred: set, true: set) -> float:
    if not pred and not true:
        return 1.0
    hit = len(pred & true)
    return 0.0 if hit == 0 else 2 * hit / (len(pred) + len(true))


def score_caption(scene: Scene, text: str, time_tolerance: int = 1) -> dict:
    """Attribute accuracy of `text` against the scene graph, per component in [0, 1], plus 'overall'
    (their mean). Components the text gives nothing to check (e.g. order with < 2 matched events) are
    left out; object/colour/shape/event/background recall is always counted, so saying nothing scores 0."""
    f = parse_text(text)
    true_names = {o.name for o in scene.objects}
    said = set(f["objects"])
    s = {"object": _f1(said, true_names),
         "colour": _f1({n.split()[0] for n in said}, {o.colour for o in scene.objects}),
         "shape": _f1({n.split()[1] for n in said}, {o.shape for o in scene.objects})}
    sizes = [size == scene.obj(n).size for n, size in f["sizes"] if n in true_names]
    motions = [m == scene.obj(n).motion for n, m in f["motions"] if n in true_names]
    truth_counts = {"start": len(scene.visible(0)), "end": len(scene.visible(scene.duration)),
                    "total": len(scene.objects)}
    counts = [n == truth_counts[w] for w, n in f["counts"]]
    for key, vals in (("size", sizes), ("motion", motions), ("count", counts)):
        if vals:
            s[key] = float(np.mean(vals))
    true_events = {(e.kind, e.value): e.time for e in scene.events}
    said_events = [(k, v, t) for k, v, t in f["events"]]
    s["event"] = _f1({(k, v) for k, v, _ in said_events}, set(true_events))
    matched = [(t, true_events[(k, v)]) for k, v, t in said_events if (k, v) in true_events]
    if matched:
        s["time"] = float(np.mean([abs(t - tt) <= time_tolerance for t, tt in matched]))
    if len(matched) >= 2:
        pairs = [(a[1], b[1]) for a, b in itertools.combinations(matched, 2)]
        s["order"] = float(np.mean([a < b for a, b in pairs]))
    true_bgs = {scene.background} | {e.value for e in scene.events if e.kind == "background"}
    s["background"] = _f1(set(f["backgrounds"]), true_bgs)
    if f["duration"] is not None:
        s["duration"] = float(abs(f["duration"] - scene.duration) <= max(time_tolerance, 0.05 * scene.duration))
    s["overall"] = float(np.mean(list(s.values())))
    s["well_formed"] = well_formed(text)  # beside the facts, not in overall (comparable with earlier scores)
    return s


def _answer_value(kind: str, text: str):
    """The canonical value an answer states (None if it states none)."""
    low = text.lower()
    if kind == "count":
        if re.search(r"\b(?:none|no)\b", low):
            return 0
        m = re.search(r"\b(\d+|" + _N + r")\b", low)
        return _to_int(m.group(1)) if m else None
    if kind == "time":
        m = re.search(r"\b(\d+)\b", low)
        return int(m.group(1)) if m else None
    if kind in ("colour", "background"):
        names = COLOURS if kind == "colour" else BACKGROUNDS
        m = re.search(r"\b(" + "|".join(names) + r")\b", low)
        return m.group(1) if m else None
    if kind == "shape":
        m = re.search(r"\b(" + "|".join(SHAPES) + r")(?:e?s)?\b", low)
        return m.group(1) if m else None
    if kind == "size":
        m = re.search(r"\b(small|large|little|big|tiny)\b", low)
        return _SIZE_WORD[m.group(1)] if m else None
    if kind == "motion":
        moves = _motions(text)
        return moves[0][1] if moves else None
    if kind == "object":
        ments = _mentions(text)
        return ments[0][1] if ments else None
    if kind == "yesno":
        m = re.search(r"\b(yes|no)\b", low)
        return m.group(1) if m else None
    if kind == "event":
        ev = parse_text(text)["events"]
        return ev[0][:2] if ev else None
    raise ValueError(f"unknown answer kind {kind!r}")


def score_answer(scene: Scene, qa: QA, text: str) -> float:
    """1.0 if `text` states `qa`'s answer (captions: score_caption's overall), else 0.0."""
    if qa.kind == "caption":
        return score_caption(scene, text)["overall"]
    return float(_answer_value(qa.kind, text) == qa.value)


# ------------------------------------------------------------------------------------------- samples


def chat_prompt(codec, visual: VisualInput | None, question: str, ids: VisionTokenIds):
    """QWEN_USER_PREFIX + vision block + question + QWEN_ASSISTANT_PREFIX (the shipped chat template's
    rendering of one user turn with a video), as a MultimodalPrompt."""
    segs = [codec.encode(QWEN_USER_PREFIX)] + ([visual] if visual is not None else [])
    return build_multimodal_prompt(segs + [codec.encode(question + QWEN_ASSISTANT_PREFIX)], ids)


def scene_sample(scene: Scene, qa: QA, codec, ids: VisionTokenIds, cfg: WorldConfig = WorldConfig(), *,
                 frames=None, roundtrip: bool = True, follow_ups: tuple[QA, ...] = ()) -> Sample:
    """A training Sample: chat prompt with the scene's video, response = answer tokens + <|im_end|>.
    `follow_ups` continue the chat about the same video (one more user turn and answer each, as the
    shipped chat template renders them); their question tokens are context, not loss targets."""
    im_end = codec.encode("<|im_end|>")
    if len(im_end) != 1:
        raise ValueError(f"codec {getattr(codec, 'name', codec)} does not encode <|im_end|> as one token: {im_end}")
    visual = visual_from_frames(render(scene, cfg) if frames is None else frames, cfg, roundtrip=roundtrip)
    response = codec.encode(qa.answer) + im_end
    mask = [True] * len(response)
    for f in follow_ups:
        turn = codec.encode("\n<|im_start|>user\n" + f.question + QWEN_ASSISTANT_PREFIX)
        answer = codec.encode(f.answer) + im_end
        response += turn + answer
        mask += [False] * len(turn) + [True] * len(answer)
    return Sample(chat_prompt(codec, visual, qa.question, ids), tuple(response),
                  None if not follow_ups else tuple(mask))


class WorldDataset(Sequence):
    """n training Samples, each rendered when indexed (deterministic in (seed, i); nothing is held in
    memory: an 8-second clip's pixel values alone are 2.4 MB). Item i asks about scene
    `split_seeds(split, n, offset)[i]` with a duration drawn from `durations`: a caption request with
    probability `caption_share`, else one of its QA pairs; `qa_per_sample` > 1 adds that many - 1
    further questions (distinct, not captions) as follow-up turns about the same video — many answers
    that depend on the video per rendered clip. `kinds` keeps only questions of those QA kinds (e.g.
    ("background",): the one-attribute task that teaches a from-scratch LM to read the visual tokens
    before the full mix; caption_share then applies only if "caption" is among them). `grid(i)` gives
    the visual grid without rendering (for bucketing by shape)."""

    def __init__(self, codec, ids: VisionTokenIds, n: int, *, split: str = "train", offset: int = 0, seed: int = 0,
                 durations=(LENGTHS["short"],), caption_share: float = 0.5, qa_per_sample: int = 1,
                 cfg: WorldConfig = WorldConfig(), roundtrip: bool = True, kinds=None):
        if qa_per_sample < 1:
            raise ValueError(f"qa_per_sample must be at least 1, got {qa_per_sample}")
        self.kinds = None if kinds is None else tuple(kinds)
        if self.kinds is not None and (not self.kinds or set(self.kinds) - set(QA_KINDS)):
            raise ValueError(f"kinds {kinds!r}: expected a non-empty subset of {QA_KINDS}")
        self.codec, self.ids, self.cfg, self.roundtrip = codec, ids, cfg, roundtrip
        self.seeds, self.seed = split_seeds(split, n, offset), seed
        self.durations, self.caption_share = tuple(int(d) for d in durations), caption_share
        self.qa_per_sample = int(qa_per_sample)

    def __len__(self) -> int:
        return len(self.seeds)

    def specs(self, i: int) -> tuple[Scene, list[QA]]:
        """The scene and questions of item i (cheap: no rendering). With `kinds`, a scene that has no
        question of those kinds is replaced by the next scene of the dataset that has one."""
        rng = np.random.default_rng([self.seed, i])
        duration = self.durations[rng.integers(len(self.durations))]  # fixed: grid(i) draws it the same way
        for k in range(len(self.seeds)):
            scene = make_scene(self.seeds[(i + k) % len(self.seeds)], duration, self.cfg)
            qas = scene_qa(scene, int(rng.integers(1 << 16)))
            caption, questions = qas[0], qas[1:]
            if self.kinds is None:
                break
            questions = [q for q in questions if q.kind in self.kinds]
            caption = caption if "caption" in self.kinds else None
            if caption is not None or questions:
                break
        else:
            raise ValueError(f"no scene of this dataset has a question of kinds {self.kinds}")
        use_caption = caption is not None and (not questions or rng.random() < self.caption_share)
        first = caption if use_caption else questions[rng.integers(len(questions))]
        if self.qa_per_sample == 1:
            return scene, [first]
        rest = [q for q in questions if q is not first]
        picks = rng.permutation(len(rest))[:self.qa_per_sample - 1]
        return scene, [first] + [rest[j] for j in picks]

    def spec(self, i: int) -> tuple[Scene, QA]:
        """The scene and (first) question of item i."""
        scene, qas = self.specs(i)
        return scene, qas[0]

    def save_settings(self, out_dir) -> Path:
        """world.json: the scene settings a model trained on this dataset saw (its export writes it)."""
        return save_scene_settings(out_dir, self.cfg)

    def grid(self, i: int) -> tuple[int, int, int]:
        rng = np.random.default_rng([self.seed, i])
        d = self.durations[rng.integers(len(self.durations))]
        return self.cfg.sampled_frames(d) // 2, self.cfg.height // 14, self.cfg.width // 14

    def __getitem__(self, i: int) -> Sample:
        if not -len(self) <= i < len(self):
            raise IndexError(f"WorldDataset index {i} out of range ({len(self)} items)")
        scene, qas = self.specs(i % len(self))
        return scene_sample(scene, qas[0], self.codec, self.ids, self.cfg, roundtrip=self.roundtrip,
                            follow_ups=tuple(qas[1:]))


def world_source(target_cfg, n: int, *, seed: int = 0, tokenizer_dir=None, world=None, **kwargs) -> WorldDataset:
    """A sample source (`synthetic.sources` signature) for the shipped target: the shipped tokenizer,
    the target's vision token ids (checked against the tokenizer), `WorldDataset` options in kwargs and
    `WorldConfig` fields in `world` (a dict, e.g. {"sprite_scale": 2.0})."""
    path = Path(tokenizer_dir or SHIPPED_DIR)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json (run python -m sparrow_jax.synthetic.tokenizer)")
    codec = load_codec(path, target_cfg.text.vocab_size)
    ids = VisionTokenIds(target_cfg.vision_start_token_id, target_cfg.vision_end_token_id,
                         target_cfg.image_token_id, target_cfg.video_token_id)
    for tok, want in (("<|vision_start|>", ids.vision_start), ("<|vision_end|>", ids.vision_end),
                      ("<|image_pad|>", ids.image_pad), ("<|video_pad|>", ids.video_pad)):
        if codec.encode(tok) != [want]:
            raise ValueError(f"{path}: tokenizer encodes {tok} as {codec.encode(tok)}, the target config uses {want}")
    if world is not None:
        kwargs["cfg"] = WorldConfig(**world)
    return WorldDataset(codec, ids, n, seed=seed, **kwargs)


def corpus(seeds, durations, variants: int = 2, cfg: WorldConfig = WorldConfig()):
    """Every caption, question and answer text of the given scenes (the tokenizer's training text)."""
    for seed in seeds:
        for d in durations:
            scene = make_scene(seed, d, cfg)
            for v in range(variants):
                for qa in scene_qa(scene, v):
                    yield qa.question
                    yield qa.answer

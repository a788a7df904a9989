"""Local video datasets in their public layouts: the training sample source (video-instruction data)
and the evaluation records of three video benchmarks, every record validated where it is read.

Training (`video_instruct_source`, the `data: video_instruct` source of train.py):
  * LLaVA-Video-178K — a JSON list (or JSONL) of {"id", "video": path under the video root,
    "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": ...}, ...],
    "data_source"}; the `<image>`/`<video>` placeholder marks the first human turn's video.
  * ShareGPT4Video — the same conversation layout (its instruction mix), or its caption file
    (sharegpt4video_40k.jsonl): {"video_id", "captions": [{"idx": "0", "content"}, ..., {"idx": "-1",
    "content": the whole-video caption}], ...}, taken as a detailed-caption request answered by the
    whole-video caption. The video is "video" / "video_path" (a path) or "video_id" (a file name
    without extension, looked up with VIDEO_SUFFIXES).
Evaluation (`load_video_detail_caption`, `load_mvbench`, `load_longvideobench`): records of
(video, prompt text, reference caption or candidates + answer index) for decode.py, which builds the
chat prompt itself; `mcq_prompt` formats a multiple-choice question the way these benchmarks'
evaluation code does; `python -m sparrow_jax.training.datasets` writes a manifest + decode.py script
and scores decode.py's --jsonl output (docs/full_scale.md).

Every problem with a record raises DatasetError "<file>:<line>: record <i>: <problem>" (the line where
the record starts; JSON syntax errors give line:column). Annotations are read and validated whole when
a loader runs (video files must exist); videos are decoded only when a sample is built.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sparrow_jax.io.text import QWEN_ASSISTANT_PREFIX, load_codec
from sparrow_jax.io.vision_inputs import default_max_visual_tokens
from sparrow_jax.models import registry
from sparrow_jax.training.data import Sample
from sparrow_jax.training.trainer import TrainConfig

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".MP4")  # tried in order for a bare video name
VISUAL_PLACEHOLDERS = ("<image>", "<video>")  # LLaVA-style markers of where the video goes in a human turn
DETAILED_CAPTION_PROMPT = "Describe this video in detail."
MCQ_INSTRUCTION = "Answer with the option's letter from the given choices directly."
FOLLOW_UP_PREFIX = "\n<|im_start|>user\n"  # after "<|im_end|>": the chat template's next user turn
HUMAN_ROLES, GPT_ROLES = ("human", "user"), ("gpt", "assistant")


class DatasetError(ValueError):
    """A record or annotation file that cannot be used; the message names the file, line and record."""


# ------------------------------------------------------------------------------------------ reading


def _at(path, line: int, index: int | None = None) -> str:
    return f"{path}:{line}" + ("" if index is None else f": record {index}")


def read_records(path) -> list[tuple[int, dict]]:
    """(line, record) of every record of a JSON list file or a JSONL file (by suffix: .jsonl = one
    record per line), in file order; DatasetError for a missing file, bad syntax or a non-object."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read annotation file ({type(e).__name__}: {e})") from None
    out = _jsonl(path, text) if path.suffix == ".jsonl" else _json_list(path, text)
    for i, (line, rec) in enumerate(out):
        if not isinstance(rec, dict):
            raise DatasetError(f"{_at(path, line, i)}: expected a JSON object, got {type(rec).__name__}")
    return out


def _jsonl(path, text: str):
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{n}:{e.colno}: record {len(out)}: malformed JSON ({e.msg})") from None
    return out


def _json_list(path, text: str):
    """Elements of a top-level JSON list with the line each starts on (json.load gives no positions)."""
    dec, ws = json.JSONDecoder(), re.compile(r"\s*")

    def fail(pos, msg):
        line = text.count("\n", 0, pos) + 1
        raise DatasetError(f"{path}:{line}:{pos - text.rfind(chr(10), 0, pos)}: malformed JSON ({msg})")

    pos = ws.match(text).end()
    if not text.startswith("[", pos):
        fail(pos, "expected a JSON list of records" if pos < len(text) else "empty file")
    out, line, seen = [], 1, 0
    pos = ws.match(text, pos + 1).end()
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            line += text.count("\n", seen, pos)
            seen = pos
            try:
                rec, pos = dec.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                at = f"{path}:{e.lineno}:{e.colno}: record {len(out)}"
                raise DatasetError(f"{at}: malformed JSON ({e.msg})") from None
            out.append((line, rec))
            pos = ws.match(text, pos).end()
            if text.startswith(",", pos):
                pos = ws.match(text, pos + 1).end()
            elif text.startswith("]", pos):
                pos += 1
                break
            else:
                fail(pos, f"expected ',' or ']' after record {len(out) - 1}")
    if ws.match(text, pos).end() != len(text):
        fail(ws.match(text, pos).end(), "extra data after the list")
    return out


# ---------------------------------------------------------------------------------------- validation


def _get(rec: dict, key: str, kind, where: str, optional: bool = False):
    """rec[key], checked: kind "str" (non-empty), "int", "number", "str_list" (non-empty strings),
    "dict_list"; DatasetError naming the record and key."""
    if key not in rec or rec[key] is None:
        if optional:
            return None
        raise DatasetError(f"{where}: missing field {key!r} (fields present: {sorted(rec)})")
    v = rec[key]
    ok = {"str": lambda: isinstance(v, str) and v.strip() != "",
          "int": lambda: isinstance(v, int) and not isinstance(v, bool),
          "number": lambda: isinstance(v, (int, float)) and not isinstance(v, bool),
          "str_list": lambda: isinstance(v, list) and len(v) > 0 and all(isinstance(x, str) and x for x in v),
          "dict_list": lambda: isinstance(v, list) and len(v) > 0 and all(isinstance(x, dict) for x in v)}[kind]()
    if not ok:
        want = {"str": "a non-empty string", "int": "an integer", "number": "a number",
                "str_list": "a non-empty list of non-empty strings", "dict_list": "a non-empty list of objects"}[kind]
        raise DatasetError(f"{where}: field {key!r} should be {want}, got {type(v).__name__} {_short(v)}")
    return v


def _short(v, n: int = 60) -> str:
    s = json.dumps(v, ensure_ascii=False)
    return s if len(s) <= n else s[:n] + "..."


def resolve_video(root, name: str, where: str, field: str) -> Path:
    """The video file `name` under `root` (a bare name without suffix tries VIDEO_SUFFIXES)."""
    base = Path(root) / name
    tried = [base] if base.suffix else [base.with_name(base.name + s) for s in VIDEO_SUFFIXES]
    for p in tried:
        if p.is_file():
            return p
    shown = str(tried[0]) if len(tried) == 1 else f"{base}{{{','.join(VIDEO_SUFFIXES)}}}"
    raise DatasetError(f"{where}: video file not found: {shown} (field {field!r} {name!r} under {root})")


# ---------------------------------------------------------------------------------- training records


@dataclasses.dataclass(frozen=True)
class InstructRecord:
    """One video-instruction record: the video and its (question, answer) turns, in order."""

    video: Path
    turns: tuple[tuple[str, str], ...]
    where: str  # file:line: record i
    id: str = ""


def _strip_placeholder(text: str) -> str:
    for ph in VISUAL_PLACEHOLDERS:
        text = text.replace(ph + "\n", "").replace(ph, "")
    return text.strip()


def _turns(conv: list, where: str) -> tuple[tuple[str, str], ...]:
    """(question, answer) pairs of a LLaVA conversation: alternating human / gpt turns, human first,
    ending on gpt; a visual placeholder only in the first human turn (one video per record)."""
    if len(conv) % 2:
        raise DatasetError(f"{where}: 'conversations' has {len(conv)} turns; expected human/gpt pairs")
    out = []
    for j in range(0, len(conv), 2):
        pair = []
        for k, roles in ((j, HUMAN_ROLES), (j + 1, GPT_ROLES)):
            turn = conv[k]
            at = f"{where}: conversations[{k}]"
            if turn.get("from") not in roles:
                raise DatasetError(f"{at}: 'from' is {turn.get('from')!r}, expected {' or '.join(map(repr, roles))} "
                                   "(turns alternate human, gpt)")
            value = _get(turn, "value", "str", at)
            if k and any(ph in value for ph in VISUAL_PLACEHOLDERS):
                raise DatasetError(f"{at}: a visual placeholder {VISUAL_PLACEHOLDERS} outside the first human turn "
                                   "(one video per record, placed before the first question)")
            pair.append(_strip_placeholder(value) if k == 0 else value)
        if not pair[0]:
            raise DatasetError(f"{where}: conversations[{j}] has no text besides the visual placeholder")
        out.append(tuple(pair))
    return tuple(out)


def _video_of(rec: dict, root, where: str) -> Path:
    for key in ("video", "video_path"):
        if rec.get(key) is not None:
            return resolve_video(root, _get(rec, key, "str", where), where, key)
    if rec.get("video_id") is not None:
        return resolve_video(root, str(_get(rec, "video_id", "str", where)), where, "video_id")
    raise DatasetError(f"{where}: missing field 'video' (or 'video_path' / 'video_id'); fields present: {sorted(rec)}")


def load_video_instruct(annotation, video_root, *, caption_prompt: str = DETAILED_CAPTION_PROMPT
                        ) -> list[InstructRecord]:
    """Records of one or more annotation files (LLaVA-Video-178K / ShareGPT4Video layouts, JSON list or
    JSONL, see the module docstring), each validated and its video found under `video_root` (one
    directory, or a list: one per annotation file)."""
    files = [annotation] if isinstance(annotation, (str, os.PathLike)) else list(annotation)
    roots = [video_root] * len(files) if isinstance(video_root, (str, os.PathLike)) else list(video_root)
    if not files or len(roots) != len(files):
        raise DatasetError(f"video_instruct: {len(files)} annotation file(s) and {len(roots)} video root(s); give one "
                           "root, or one per annotation file")
    for r in roots:
        if not Path(r).is_dir():
            raise DatasetError(f"video_instruct: video_root {r}: not a directory")
    out = []
    for f, root in zip(files, roots):
        for i, (line, rec) in enumerate(read_records(f)):
            where = _at(f, line, i)
            if "conversations" in rec:
                turns = _turns(_get(rec, "conversations", "dict_list", where), where)
            elif "captions" in rec:
                caps = _get(rec, "captions", "dict_list", where)
                whole = [c for c in caps if str(c.get("idx")) == "-1"]
                if not whole:
                    raise DatasetError(f"{where}: 'captions' has no whole-video caption (an entry with idx \"-1\")")
                turns = ((caption_prompt, _get(whole[0], "content", "str", f"{where}: captions[idx -1]")),)
            else:
                raise DatasetError(f"{where}: neither 'conversations' (LLaVA-Video-178K / ShareGPT4Video instruction "
                                   f"layout) nor 'captions' (ShareGPT4Video caption layout); fields: {sorted(rec)}")
            rid = rec.get("id", rec.get("video_id", ""))
            out.append(InstructRecord(_video_of(rec, root, where), turns, where, str(rid)))
    if not out:
        raise DatasetError(f"{', '.join(map(str, files))}: no records")
    return out


# ----------------------------------------------------------------------------------- prompt building


def chat_prompt(target_cfg, codec, visual, question: str):
    """One user turn with the video before its text and the assistant prefix, as the family's chat
    template renders it (and decode.py builds it): Qwen2.5-VL `<|vision_start|>pads<|vision_end|>question`,
    LLaVA-OneVision `<video pads>\\nquestion`. `visual` None = a text-only prompt."""
    return registry.family_of(target_cfg).chat_prompt(target_cfg, codec, visual, question)

def conversation_sample(target_cfg, codec, visual, turns, *, max_text_tokens: int | None = None,
                        where: str = "sample") -> Sample:
    """A training Sample: the first question (with the video) is the prompt; the response holds each
    answer + <|im_end|> (loss targets) and, between answers, the follow-up user turns (context only,
    `response_mask` False). `max_text_tokens` bounds the text positions (prompt text + response): later
    turns that do not fit are dropped, then the response is cut."""
    im_end = codec.encode("<|im_end|>")
    if len(im_end) != 1:
        raise ValueError(f"tokenizer {getattr(codec, 'name', codec)} does not encode <|im_end|> as one token")
    prompt = chat_prompt(target_cfg, codec, visual, turns[0][0])
    left = None
    if max_text_tokens is not None:
        left = max_text_tokens - int((np.asarray(prompt.mm_token_type_ids) == 0).sum())
        if left < 2:
            raise DatasetError(f"{where}: the first question takes {max_text_tokens - left} text tokens, leaving "
                               f"{left} of max_text_tokens {max_text_tokens} for the answer")
    response = codec.encode(turns[0][1]) + im_end
    mask = [True] * len(response)
    for q, a in turns[1:]:
        turn, ans = codec.encode(FOLLOW_UP_PREFIX + q + QWEN_ASSISTANT_PREFIX), codec.encode(a) + im_end
        if left is not None and len(response) + len(turn) + len(ans) > left:
            break
        response += turn + ans
        mask += [False] * len(turn) + [True] * len(ans)
    if left is not None:
        response, mask = response[:left], mask[:left]
    return Sample(prompt, tuple(response), tuple(mask) if not all(mask) else None)


class VideoReader:
    """path -> the family's preprocessed video, with the target's preprocessing: Qwen2.5-VL from its
    vision config and (in `model_dir`) video_preprocessor_config.json / preprocessor_config.json, then
    the explicit options; LLaVA-OneVision `num_frames` uniformly sampled frames at its tile size. Both
    cut to `max_visual_tokens` (default: 90 % of the context, decode.py's rule)."""

    def __init__(self, target_cfg, model_dir=None, *, max_visual_tokens: int | None = None, num_frames=None,
                 **video_options):
        self.cfg = target_cfg
        self.budget = max_visual_tokens or default_max_visual_tokens(target_cfg.text.max_position_embeddings)
        unknown = set(video_options) - set(registry.VIDEO_OPTIONS)
        if unknown:
            raise ValueError(f"unknown video option(s) {sorted(unknown)}")
        options = {**video_options, "num_frames": num_frames}
        foreign = registry.foreign_video_options(target_cfg)
        given = sorted(k for k in foreign if options.get(k) is not None)
        if given:
            keys = f"{given} apply" if len(foreign) > 1 else f"{given[0]} applies"
            raise ValueError(f"{keys} to {registry.video_option_owners(given[0])} targets; "
                             f"{registry.frames_note(target_cfg)}")
        options = {k: v for k, v in options.items() if v is not None}
        self.read = registry.family_of(target_cfg).visual_readers(target_cfg, model_dir, budget=self.budget,
                                                                  options=options).video

    def __call__(self, path):
        return self.read(path)


def load_codec_for(target_cfg, tokenizer_dir):
    """The target's tokenizer (tokenizer_dir/tokenizer.json), checked for one-token chat markers (and
    those the family's config names, for the id it gives)."""
    if tokenizer_dir is None or not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        raise ValueError(f"video_instruct: tokenizer_dir {tokenizer_dir}: no tokenizer.json (pass the target's HF "
                         "directory in data_options.tokenizer_dir)")
    codec = load_codec(tokenizer_dir, target_cfg.text.vocab_size)
    marks = (("<|im_start|>", None), ("<|im_end|>", None)) + registry.family_of(target_cfg).tokenizer_marks
    for m, _ in marks:
        if len(codec.encode(m)) != 1:
            raise ValueError(f"{tokenizer_dir}: tokenizer encodes {m} as {codec.encode(m)}, not one token")
    for m, field in marks:
        if field is not None and codec.encode(m) != [getattr(target_cfg, field)]:
            raise ValueError(f"{tokenizer_dir}: tokenizer's {m} is {codec.encode(m)}, the target config's {field} is "
                             f"{getattr(target_cfg, field)}")
    return codec


class VideoInstructDataset(Sequence):
    """n training Samples drawn from the records (a seeded permutation per pass over them), each built
    when indexed: the video decoded and preprocessed for the target, the chat turns tokenized. A
    `text_only_share` of the items (chosen by seed) leaves the video out (MSD's text-first curriculum
    needs text-only samples)."""

    def __init__(self, records, target_cfg, codec, reader: VideoReader, n: int, *, seed: int = 0,
                 max_text_tokens: int | None = None, text_only_share: float = 0.0):
        if not 0 <= text_only_share <= 1:
            raise ValueError(f"text_only_share {text_only_share}: expected a fraction in [0, 1]")
        self.records, self.cfg, self.codec, self.reader = list(records), target_cfg, codec, reader
        self.n, self.seed, self.max_text_tokens, self.text_only_share = int(n), seed, max_text_tokens, text_only_share

    def __len__(self) -> int:
        return self.n

    def record(self, i: int) -> InstructRecord:
        N = len(self.records)
        epoch, j = divmod(i, N)
        return self.records[int(np.random.default_rng([self.seed, epoch]).permutation(N)[j])]

    def is_visual(self, i: int) -> bool:
        return not (self.text_only_share and np.random.default_rng([self.seed, i, 1]).random() < self.text_only_share)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"VideoInstructDataset index {i} out of range ({len(self)} items)")
        i %= len(self)
        rec = self.record(i)
        visual = None
        if self.is_visual(i):
            try:
                visual = self.reader(rec.video)
            except ValueError as e:  # VisionInputError names the file; add the record that points at it
                raise DatasetError(f"{rec.where}: {e}") from None
        return conversation_sample(self.cfg, self.codec, visual, rec.turns, max_text_tokens=self.max_text_tokens,
                                   where=rec.where)


def video_instruct_source(target_cfg, n: int, *, seed: int = 0, annotation=None, video_root=None,
                          tokenizer_dir=None, max_visual_tokens: int | None = None, fps: float | None = None,
                          max_frames: int | None = None, min_pixels: int | None = None, max_pixels: int | None = None,
                          num_frames: int | None = None, max_text_tokens: int | None = None,
                          text_only_share: float = 0.0, caption_prompt: str = DETAILED_CAPTION_PROMPT
                          ) -> VideoInstructDataset:
    """A sample source (`synthetic.sources` signature) over local LLaVA-Video-178K / ShareGPT4Video
    annotation file(s) `annotation` (a path or a list) with videos under `video_root` (a directory, or
    one per annotation file). `tokenizer_dir`:
    the target's HF directory (tokenizer.json; Qwen's preprocessor JSON files are read from it too).
    Video options: Qwen2.5-VL fps / max_frames / min_pixels / max_pixels, LLaVA-OneVision num_frames;
    max_visual_tokens caps either (set it to the training config's max_visual). max_text_tokens: set it
    to max_text (longer conversations lose their last turns)."""
    if annotation is None or video_root is None:
        raise ValueError("video_instruct: data_options needs 'annotation' (a JSON/JSONL file or a list of them) and "
                         "'video_root' (the directory the records' video paths are relative to)")
    codec = load_codec_for(target_cfg, tokenizer_dir)
    reader = VideoReader(target_cfg, tokenizer_dir, max_visual_tokens=max_visual_tokens, num_frames=num_frames,
                         fps=fps, max_frames=max_frames, min_pixels=min_pixels, max_pixels=max_pixels)
    records = load_video_instruct(annotation, video_root, caption_prompt=caption_prompt)
    return VideoInstructDataset(records, target_cfg, codec, reader, n, seed=seed, max_text_tokens=max_text_tokens,
                                text_only_share=text_only_share)


# ------------------------------------------------------------------------------------- eval records


@dataclasses.dataclass(frozen=True)
class EvalRecord:
    """One benchmark question: the video, the prompt text decode.py gets (--prompt), and the reference
    (an open-ended `reference` answer, or `candidates` with the correct `answer_index`)."""

    bench: str
    id: str
    video: str
    prompt: str
    where: str
    reference: str | None = None
    candidates: tuple[str, ...] = ()
    answer_index: int | None = None
    task: str | None = None
    duration: float | None = None
    bound: tuple[float, float] | None = None  # MVBench clip (start, end) s; decode.py reads the whole video

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def mcq_prompt(question: str, candidates, question_prefix: str = "") -> str:
    """Question, lettered options and the benchmarks' instruction (LongVideoBench's loader, lmms-eval):
    "<prefix><question>\\nA. ...\\nB. ...\\nAnswer with the option's letter from the given choices directly." """
    if not 2 <= len(candidates) <= len(LETTERS):
        raise ValueError(f"{len(candidates)} candidates: expected 2 to {len(LETTERS)}")
    options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(candidates))
    return f"{question_prefix}{question}\n{options}\n{MCQ_INSTRUCTION}"


def load_video_detail_caption(annotation, video_root) -> list[EvalRecord]:
    """VideoDetailCaption (VideoChatGPT detail set, lmms-lab layout): records {"video_name", "question",
    "answer"} in a JSON list or JSONL; the video is video_name under video_root (suffix optional)."""
    out = []
    for i, (line, rec) in enumerate(read_records(annotation)):
        where = _at(annotation, line, i)
        name = _get(rec, "video_name", "str", where)
        video = resolve_video(video_root, name, where, "video_name")
        out.append(EvalRecord("videodetailcaption", str(rec.get("id", name)), str(video),
                              _get(rec, "question", "str", where), where, reference=_get(rec, "answer", "str", where)))
    return out


# MVBench task -> (json file, video directory under the video root, "video" | "frame", has a (start, end) bound),
# as in the benchmark's own data_list (OpenGVLab Ask-Anything video_chat2/mvbench.ipynb).
MVBENCH_TASKS = {
    "Action Sequence": ("action_sequence.json", "star/Charades_v1_480", "video", True),
    "Action Prediction": ("action_prediction.json", "star/Charades_v1_480", "video", True),
    "Action Antonym": ("action_antonym.json", "ssv2_video", "video", False),
    "Fine-grained Action": ("fine_grained_action.json", "Moments_in_Time_Raw/videos", "video", False),
    "Unexpected Action": ("unexpected_action.json", "FunQA_test/test", "video", False),
    "Object Existence": ("object_existence.json", "clevrer/video_validation", "video", False),
    "Object Interaction": ("object_interaction.json", "star/Charades_v1_480", "video", True),
    "Object Shuffle": ("object_shuffle.json", "perception/videos", "video", False),
    "Moving Direction": ("moving_direction.json", "clevrer/video_validation", "video", False),
    "Action Localization": ("action_localization.json", "sta/sta_video", "video", True),
    "Scene Transition": ("scene_transition.json", "scene_qa/video", "video", False),
    "Action Count": ("action_count.json", "perception/videos", "video", False),
    "Moving Count": ("moving_count.json", "clevrer/video_validation", "video", False),
    "Moving Attribute": ("moving_attribute.json", "clevrer/video_validation", "video", False),
    "State Change": ("state_change.json", "perception/videos", "video", False),
    "Fine-grained Pose": ("fine_grained_pose.json", "nturgbd", "video", False),
    "Character Order": ("character_order.json", "perception/videos", "video", False),
    "Egocentric Navigation": ("egocentric_navigation.json", "vlnqa", "video", False),
    "Episodic Reasoning": ("episodic_reasoning.json", "tvqa/frames_fps3_hq", "frame", True),
    "Counterfactual Inference": ("counterfactual_inference.json", "clevrer/video_validation", "video", False),
}


def load_mvbench(root, tasks=None, *, json_dir: str = "json", video_dir: str = "video") -> list[EvalRecord]:
    """MVBench from its local copy: root/json/<task>.json lists of {"video", "question", "candidates",
    "answer": the correct candidate's text} and videos under root/video/<task's directory>. `tasks`:
    names in MVBENCH_TASKS, or None = every task stored as video files (Episodic Reasoning is stored as
    frame directories, which decode.py cannot read)."""
    names = [t for t, spec in MVBENCH_TASKS.items() if spec[2] == "video"] if tasks is None else list(tasks)
    out = []
    for task in names:
        if task not in MVBENCH_TASKS:
            raise ValueError(f"MVBench task {task!r}: not one of {sorted(MVBENCH_TASKS)}")
        fname, vdir, kind, has_bound = MVBENCH_TASKS[task]
        if kind != "video":
            raise ValueError(f"MVBench task {task!r}: its videos are frame directories ({vdir}); decode.py reads video "
                             "files only — leave the task out")
        path = Path(root) / json_dir / fname
        if not path.is_file():
            raise DatasetError(f"{path}: not found (MVBench task {task!r}; choose the tasks a partial copy holds)")
        for i, (line, rec) in enumerate(read_records(path)):
            where = _at(path, line, i)
            video = resolve_video(Path(root) / video_dir / vdir, _get(rec, "video", "str", where), where, "video")
            question, cands = _get(rec, "question", "str", where), _get(rec, "candidates", "str_list", where)
            answer = _get(rec, "answer", "str", where)
            if answer not in cands:
                raise DatasetError(f"{where}: answer {answer!r} is not one of the candidates {cands}")
            bound = None
            if has_bound and rec.get("start") is not None:
                bound = (float(_get(rec, "start", "number", where)), float(_get(rec, "end", "number", where)))
            rid = f"{fname.removesuffix('.json')}/{i}"
            out.append(EvalRecord("mvbench", rid, str(video), mcq_prompt(question, cands), where,
                                  candidates=tuple(cands), answer_index=cands.index(answer), task=task, bound=bound))
    return out


def load_longvideobench(annotation, video_root) -> list[EvalRecord]:
    """LongVideoBench (lvb_val.json): records {"id", "video_path" (under video_root, i.e. <root>/videos),
    "question", "candidates", "correct_choice": index, "duration", "question_category", ...}. The prompt
    is its loader's ("Question: ..." + options + instruction) without the interleaved subtitles."""
    out = []
    for i, (line, rec) in enumerate(read_records(annotation)):
        where = _at(annotation, line, i)
        if rec.get("video_path") is not None:
            video = resolve_video(video_root, _get(rec, "video_path", "str", where), where, "video_path")
        else:
            video = resolve_video(video_root, _get(rec, "video_id", "str", where), where, "video_id")
        question, cands = _get(rec, "question", "str", where), _get(rec, "candidates", "str_list", where)
        choice = _get(rec, "correct_choice", "int", where)
        if not 0 <= choice < len(cands):
            raise DatasetError(f"{where}: correct_choice {choice} is outside the {len(cands)} candidates")
        duration = _get(rec, "duration", "number", where, optional=True)
        out.append(EvalRecord("longvideobench", str(rec.get("id", i)), str(video),
                              mcq_prompt(question, cands, "Question: "), where, candidates=tuple(cands),
                              answer_index=choice, task=rec.get("question_category"),
                              duration=None if duration is None else float(duration)))
    return out


# ----------------------------------------------------------------------------------------- scoring

_ANSWER_PREFIXES = re.compile(r"^\s*(the\s+)?(best|correct)?\s*(answer|option)\s*(is)?\s*[:：]?\s*", re.I)


def parse_choice(text: str, num_candidates: int) -> int | None:
    """The option a generated answer picks: the first standalone capital letter among the options
    after an "Answer:"-style prefix ("B", "(B)", "B. a cat", "The answer is B"); None when none."""
    m = re.search(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])", _ANSWER_PREFIXES.sub("", text))
    if m is None or LETTERS.index(m.group(1)) >= num_candidates:
        return None
    return LETTERS.index(m.group(1))


def unigram_f1(prediction: str, reference: str) -> float:
    """Bag-of-words F1 between two texts: a local sanity check only — VideoDetailCaption's own score is a
    GPT judge, which this project does not run."""
    tok = lambda s: re.findall(r"[a-z0-9]+", s.lower())  # noqa: E731
    p, r = tok(prediction), tok(reference)
    if not p or not r:
        return 0.0
    common = sum(min(p.count(w), r.count(w)) for w in set(p))
    return 0.0 if common == 0 else 2 * common / (len(p) + len(r))


def score(records: list[EvalRecord], predictions: list[dict], source: str = "predictions") -> dict:
    """Join decode.py --jsonl lines (in order, one per record, prompts checked) with the records: MCQ
    accuracy overall and per task, caption unigram F1 (proxy), and the speed figures decode.py wrote
    (tau, DSR, ESR) averaged over the lines that have them."""
    if len(predictions) != len(records):
        raise DatasetError(f"{source}: {len(predictions)} decode lines for {len(records)} records (run the rest; "
                           "the script resumes)")
    per_task: dict[str, list[int]] = {}
    f1s, speed = [], {k: [] for k in ("tau", "DSR", "ESR")}
    for i, (rec, pred) in enumerate(zip(records, predictions)):
        if pred.get("prompt") != rec.prompt:
            raise DatasetError(f"{source}:{i + 1}: prompt differs from record {i} ({rec.where}): lines are out of "
                               "order or from another manifest")
        text = pred.get("text", "")
        if rec.answer_index is not None:
            per_task.setdefault(rec.task or rec.bench, []).append(int(parse_choice(text, len(rec.candidates))
                                                                       == rec.answer_index))
        elif rec.reference is not None:
            f1s.append(unigram_f1(text, rec.reference))
        for k in speed:
            if pred.get(k) is not None:
                speed[k].append(float(pred[k]))
    out = {"records": len(records)}
    if per_task:
        hits = [h for v in per_task.values() for h in v]
        out["accuracy"] = sum(hits) / len(hits)
        out["accuracy_per_task"] = {t: sum(v) / len(v) for t, v in sorted(per_task.items())}
    if f1s:
        out["unigram_f1_proxy"] = float(np.mean(f1s))
    out.update({f"mean_{k}": float(np.mean(v)) for k, v in speed.items() if v})
    return out


# -------------------------------------------------------------------------------------------- CLI


def eval_records(bench: str, *, annotation=None, video_root=None, root=None, tasks=None) -> list[EvalRecord]:
    if bench == "videodetailcaption":
        return load_video_detail_caption(annotation, video_root)
    if bench == "mvbench":
        return load_mvbench(root, tasks)
    if bench == "longvideobench":
        return load_longvideobench(annotation, video_root)
    raise ValueError(f"benchmark {bench!r}: expected videodetailcaption, mvbench or longvideobench")


def write_eval_dir(records: list[EvalRecord], out_dir, *, batch: int = 1, decode: str = "decode.py") -> Path:
    """out_dir/manifest.jsonl (the records) and out_dir/run.sh: decode.py over the records, `batch` rows
    per call, appending to out_dir/decode.jsonl; arguments to run.sh go to every decode.py call (target,
    draft, mode, ...). A call whose rows are already in decode.jsonl is skipped (resume)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "manifest.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
    preds = shlex.quote(str(out / "decode.jsonl"))
    lines = ["#!/usr/bin/env bash", "# written by python -m sparrow_jax.training.datasets manifest; "
             "usage: bash run.sh --target DIR [--draft DIR --mode sparrow --max-new-tokens N ...]", "set -e",
             f"done_rows() {{ [ -f {preds} ] && wc -l < {preds} || echo 0; }}"]
    for s in range(0, len(records), batch):
        chunk = records[s:s + batch]
        args = " ".join(f"--video {shlex.quote(r.video)} --prompt {shlex.quote(r.prompt)}" for r in chunk)
        lines.append(f'[ "$(done_rows)" -ge {s + len(chunk)} ] || python {decode} "$@" --no-stream --jsonl {preds} '
                     f"{args}")
    (out / "run.sh").write_text("\n".join(lines) + "\n")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m sparrow_jax.training.datasets",
                                 description="Check training annotations; benchmark manifests for decode.py and their "
                                 "scores (docs/full_scale.md).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="validate video-instruction annotations (every record, every video file)")
    c.add_argument("--config", help="a training config whose data_options name the annotation files and video roots")
    c.add_argument("--annotation", action="append", help="an annotation file (repeatable)")
    c.add_argument("--video-root", action="append", help="video root (one, or one per --annotation)")
    m = sub.add_parser("manifest", help="validate a benchmark's local copy; write manifest.jsonl and run.sh")
    m.add_argument("--bench", required=True, choices=["videodetailcaption", "mvbench", "longvideobench"])
    m.add_argument("--annotation", help="videodetailcaption / longvideobench: the JSON or JSONL annotation file")
    m.add_argument("--video-root", help="videodetailcaption / longvideobench: directory of the videos")
    m.add_argument("--root", help="mvbench: directory holding json/ and video/")
    m.add_argument("--task", action="append", help="mvbench: a task name (repeatable; default all video tasks)")
    m.add_argument("--limit", type=int, help="first N records only")
    m.add_argument("--batch", type=int, default=1, help="rows per decode.py call")
    m.add_argument("--out", required=True, help="output directory")
    s = sub.add_parser("score", help="score decode.py --jsonl output against a manifest")
    s.add_argument("--dir", required=True, help="directory written by `manifest` (manifest.jsonl, decode.jsonl)")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "check":
            if args.config:
                opts = TrainConfig.from_file_and_overrides(args.config, []).data_options
                files, roots = opts.get("annotation"), opts.get("video_root")
            else:
                files, roots = args.annotation, args.video_root
            if not files or not roots:
                raise ValueError("check: give --config, or --annotation and --video-root")
            roots = roots[0] if isinstance(roots, list) and len(roots) == 1 else roots
            recs = load_video_instruct(files, roots)
            turns = [len(r.turns) for r in recs]
            print(f"{len(recs)} records OK ({sum(turns)} question/answer turns, at most {max(turns)} per record; "
                  f"{len({r.video for r in recs})} distinct videos)")
        elif args.cmd == "manifest":
            recs = eval_records(args.bench, annotation=args.annotation, video_root=args.video_root, root=args.root,
                                tasks=args.task)[:args.limit]
            out = write_eval_dir(recs, args.out, batch=args.batch)
            print(f"{len(recs)} records -> {out}/manifest.jsonl; run: bash {out}/run.sh --target DIR ...")
        else:
            d = Path(args.dir)
            recs = [EvalRecord(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in rec.items()})
                    for _, rec in read_records(d / "manifest.jsonl")]
            preds = [rec for _, rec in read_records(d / "decode.jsonl")]
            print(json.dumps(score(recs, preds, str(d / "decode.jsonl")), indent=1))
    except (ValueError, OSError) as e:
        raise SystemExit(f"datasets: error: {e}") from None


if __name__ == "__main__":
    main()

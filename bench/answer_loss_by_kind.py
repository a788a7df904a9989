"""Teacher-forced answer loss per question kind with the real video and with control videos: the quick
"does the target read the video, and for which questions" probe used while training the shipped target.
Cheaper than bench/target_reads_video.py (no generation): one forward per batch of held-out questions.

  python bench/answer_loss_by_kind.py --target shipped/tiny-qwen2.5-vl
  python bench/answer_loss_by_kind.py --run configs/target_curriculum/01_captions_static.json --world max_events=0 \
      --world sprite_scale=2 --world max_visible=1 --kinds caption --content --by-word   # a run's latest checkpoint

Held-out questions: validation-split scenes (8 s by default), `--per-kind` questions of each kind (the same
ones for every model). Loss = mean cross-entropy per answer token (the answer's template words included, so
a gap between real and blank comes only from the content words). A target that reads the video for a kind
has a clearly lower loss with the real video than with a blank one. Kind `caption` is the detailed-caption
request; `--content` adds the loss over the attribute words only (colours, shapes, sizes, backgrounds,
motions, numbers), where a caption's gap shows undiluted by its many text-predictable words. Results: one JSON line per (model,
kind, condition) in --jsonl, and a printed table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import environment, write_jsonl  # noqa: E402

KINDS = "background,colour,shape,size,count,motion,yesno"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--target", help="HF checkpoint directory (with the tokenizer files)")
    src.add_argument("--run", help="a target-training config: probe the latest checkpoint of its out_dir")
    ap.add_argument("--kinds", default=KINDS, help="question kinds, comma-separated")
    ap.add_argument("--per-kind", type=int, default=24, help="held-out questions per kind (a multiple of --batch)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-text", type=int, default=192, help="text tokens per sample (captions need ~150)")
    ap.add_argument("--duration", type=int, default=8, help="video length in seconds")
    ap.add_argument("--conditions", default="real,blank", help="real, blank, shuffled")
    ap.add_argument("--world", action="append", default=[], metavar="FIELD=VALUE",
                    help="a WorldConfig field of the held-out scenes (e.g. sprite_scale=2, max_visible=1); repeatable")
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the target's, else the shipped one)")
    ap.add_argument("--jsonl", default=str(HERE / "results" / "answer_loss_by_kind.jsonl"))
    ap.add_argument("--content", action="store_true",
                    help="also the loss on content tokens only (colour, shape, size, background, motion and number "
                         "words): in a caption most tokens follow from the text, these only from the video")
    ap.add_argument("--by-word", action="store_true",
                    help="with --content: also the loss per attribute word (which facts the target reads)")
    args = ap.parse_args(argv)
    try:
        args.world = {k: json.loads(v) for k, v in (w.split("=", 1) for w in args.world)}
    except ValueError as e:
        ap.error(f"--world expects FIELD=VALUE with a JSON value: {e}")
    if args.per_kind < args.batch or args.per_kind % args.batch:
        ap.error(f"--per-kind {args.per_kind} must be a positive multiple of --batch {args.batch}")
    return args


def load_run_model(config_path):
    """The model at the latest checkpoint of a target-training run (restored from a copy, so a run
    still writing its checkpoints is not disturbed)."""
    from sparrow_jax.training.target_trainer import TargetTrainer  # noqa: PLC0415
    from sparrow_jax.training.trainer import TrainConfig  # noqa: PLC0415

    cfg = TrainConfig.from_file_and_overrides(config_path, [])
    src = Path(cfg.out_dir) / "checkpoints"
    steps = sorted(int(p.name) for p in src.iterdir() if p.name.isdigit()) if src.is_dir() else []
    if not steps:
        raise SystemExit(f"{config_path}: no checkpoint in {src}")
    tmp = Path(tempfile.mkdtemp(prefix="answer_loss_"))
    shutil.copytree(src / str(steps[-1]), tmp / "checkpoints" / str(steps[-1]))
    # The run's own samples (the world source is lazy): its buckets, so the saved data state restores.
    tr = TargetTrainer(dataclasses.replace(cfg, out_dir=str(tmp), tensorboard=False), log=lambda *a, **k: None)
    if not tr.restore_latest():
        raise SystemExit(f"{config_path}: could not restore step {steps[-1]}")
    shutil.rmtree(tmp, ignore_errors=True)
    return tr.model(), f"{config_path}@{tr.step}", cfg.tokenizer_dir


def held_out_questions(kinds, per_kind: int, duration: int, wcfg):
    """{kind: [(scene, qa)]}: the first `per_kind` questions of each kind over validation scenes."""
    from sparrow_jax.synthetic import world  # noqa: PLC0415

    out = {k: [] for k in kinds}
    for seed in world.split_seeds("validation", 2000):
        scene = world.make_scene(seed, duration, wcfg)
        for qa in world.scene_qa(scene, 0):
            if qa.kind in out and len(out[qa.kind]) < per_kind:
                out[qa.kind].append((scene, qa))
        if all(len(v) == per_kind for v in out.values()):
            return out
    short = {k: len(v) for k, v in out.items() if len(v) < per_kind}
    raise SystemExit(f"not enough held-out questions of kinds {short} (asked {per_kind} each)")


def content_token_ids(codec, vocab_size: int) -> np.ndarray:
    """[V] bool: token ids whose text (stripped, lower-case) is a whole attribute word of the world
    (`world.ATTRIBUTE_WORDS`) or the start of one (BPE may split a word; only its first piece is counted)."""
    from sparrow_jax.synthetic.world import ATTRIBUTE_WORDS  # noqa: PLC0415

    out = np.zeros(vocab_size, bool)
    for i in range(vocab_size):
        try:
            t = codec.decode([i]).strip().lower()
        except Exception:  # noqa: BLE001  special or unused ids decode to nothing useful
            continue
        out[i] = len(t) >= 2 and t.isalpha() and (t in ATTRIBUTE_WORDS or
                                                  (len(t) >= 3 and any(w.startswith(t) for w in ATTRIBUTE_WORDS)))
    return out


def main(argv=None):
    args = parse_args(argv)
    import jax  # noqa: PLC0415

    from sparrow_jax.io.text import load_codec  # noqa: PLC0415
    from sparrow_jax.models import registry  # noqa: PLC0415
    from sparrow_jax.synthetic import demo, world  # noqa: PLC0415
    from sparrow_jax.training.target_trainer import answer_metrics, answer_token_stats, target_batch, \
        weighted_sums  # noqa: PLC0415

    if args.target:
        model, name, tok = registry.load_target(args.target), args.target, args.target
    else:
        model, name, tok = load_run_model(args.run)
    tok = args.tokenizer or tok or "shipped/tiny-qwen2.5-vl"
    codec = load_codec(tok, model.cfg.text.vocab_size)
    ids = world.world_source(model.cfg, 1, tokenizer_dir=tok).ids
    kinds = [k for k in args.kinds.split(",") if k]
    try:  # the target's own world (its world.json), with --world on top
        wcfg = dataclasses.replace(demo.target_world(args.target or tok), **args.world)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"--world {args.world}: {e}") from None
    questions = held_out_questions(kinds, args.per_kind, args.duration, wcfg)
    token_stats = jax.jit(lambda b: answer_token_stats(model, b))  # one forward per batch serves every weighting
    content = content_token_ids(codec, model.cfg.text.vocab_size) if args.content else None
    env = environment()
    print(f"{name}: answer loss per token ({args.per_kind} held-out questions per kind, {args.duration} s)")
    cols = [c + sfx for c in args.conditions.split(",") for sfx in ("", ":content")[:1 + args.content]]
    print(f"{'kind':<12}" + "".join(f"{c:>14}" for c in cols))
    scene_settings = {k: getattr(wcfg, k) for k in world.SCENE_FIELDS}
    for kind in kinds:
        row, per_word = {}, {}
        for cond in args.conditions.split(","):
            tot, words = None, {}
            items = questions[kind]
            for i0 in range(0, len(items), args.batch):
                samples = [world.scene_sample(s, qa, codec, ids, wcfg, frames=world.ablate(world.render(s, wcfg), cond))
                           for s, qa in items[i0:i0 + args.batch]]
                batch = target_batch(samples, model.cfg, max_text=args.max_text)
                ce_BL, hit_BL = (np.asarray(x, np.float64) for x in token_stats(batch))
                lab_BL, first_BL = np.asarray(batch.labels_BL), np.asarray(batch.first_BL, np.float64)
                weight_BL = np.asarray(batch.weight_BL, np.float64)
                s = weighted_sums(ce_BL, hit_BL, weight_BL, first_BL)
                if content is not None:
                    keep_BL = weight_BL * content[lab_BL]
                    s |= {f"content_{k}": v for k, v in weighted_sums(ce_BL, hit_BL, keep_BL, first_BL).items()}
                    if args.by_word:
                        for b, j in zip(*np.nonzero(keep_BL)):
                            words.setdefault(codec.decode([int(lab_BL[b, j])]).strip(), []).append(float(ce_BL[b, j]))
                tot = s if tot is None else {k: tot[k] + v for k, v in s.items()}
            m = {k: float(v) for k, v in answer_metrics(tot).items()}
            if content is not None:
                cm = answer_metrics({k[8:]: v for k, v in tot.items() if k.startswith("content_")})
                m |= {"content_loss": float(cm["loss"]), "content_top1": float(cm["top1"]),
                      "content_tokens": float(tot["content_tokens"])}
            row[cond] = m["loss"]
            if content is not None:
                row[f"{cond}:content"] = m["content_loss"]
            if words:
                per_word[cond] = m["by_word"] = {w: [len(v), float(np.mean(v))] for w, v in sorted(words.items())}
            write_jsonl(args.jsonl, {"bench": "answer_loss_by_kind", "model": name, "kind": kind, "condition": cond,
                                     "duration_s": args.duration, "world": args.world, "scene_settings": scene_settings,
                                     "questions": len(items), **m, **env})
        print(f"{kind:<12}" + "".join(f"{row[c]:>14.4f}" for c in cols), flush=True)
        if per_word:
            conds = list(per_word)
            for w in sorted(per_word[conds[0]], key=lambda w: -per_word[conds[0]][w][0]):
                print(f"  {w:<10} n={per_word[conds[0]][w][0]:<4}" + "".join(
                    f"{c}={per_word[c][w][1]:.3f}  " for c in conds if w in per_word[c]), flush=True)


if __name__ == "__main__":
    main()

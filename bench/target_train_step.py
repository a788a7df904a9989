"""Seconds per sample of the full target train step (vision tower + LM, forward + backward + AdamW), to
size the shipped target's training budget (SPEC §7).

The step is `TargetTrainer`'s own jitted step (training/target_trainer.py), fp32, batch B, on random
pixels (the cost does not depend on the values): a video of V visual tokens at low resolution
(--side pixels square, so (side/28)^2 tokens per temporal step of 2 frames) plus a text of --text
tokens (prompt, vision markers and a --answer-token answer; the loss is on the answer). LM sizes:
`tiny` is configs/tiny.json as is; `LxD` replaces its LM by L layers of width D (D/64 heads of 64,
kv heads D/128, MLP 2D; the vision tower's output width follows D). Each cell reports the median of
--repeats steps after one compile call, and the load average (other jobs share the cores).

  python bench/target_train_step.py
  python bench/target_train_step.py --lm tiny 6x384 8x512 --visual-tokens 128 512 --batch 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_jsonl  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def lm_config(base: dict, lm: str) -> dict:
    d = json.loads(json.dumps(base))
    if lm == "tiny":
        return d
    layers, width = (int(x) for x in lm.split("x"))
    d["text_config"].update(num_hidden_layers=layers, hidden_size=width, intermediate_size=2 * width,
                            num_attention_heads=width // 64, num_key_value_heads=max(1, width // 128))
    d["vision_config"]["out_hidden_size"] = width
    return d


def samples_for(model_cfg, visual_tokens: int, side: int, text: int, answer: int, n: int, rng):
    from sparrow_jax.io.vision_inputs import VisionTokenIds, VisualInput, build_multimodal_prompt  # noqa: PLC0415
    from sparrow_jax.training.data import Sample  # noqa: PLC0415

    v = model_cfg.vision
    g = side // v.patch_size
    per_t = g * g // v.spatial_merge_size**2
    if visual_tokens % per_t:
        raise SystemExit(f"--visual-tokens {visual_tokens} is not a multiple of {per_t} (tokens per temporal step)")
    t = visual_tokens // per_t
    ids = VisionTokenIds(model_cfg.vision_start_token_id, model_cfg.vision_end_token_id, model_cfg.image_token_id,
                         model_cfg.video_token_id)
    prompt_text = text - answer - 2
    n_words = min(model_cfg.text.vocab_size, *(ids.vision_start, ids.vision_end, ids.image_pad, ids.video_pad))
    out = []
    for _ in range(n):
        pix = rng.standard_normal((t * g * g, v.patch_dim)).astype(np.float32)
        video = VisualInput("video", pix, (t, g, g), 1.0, v.spatial_merge_size)
        words = rng.integers(1, n_words, prompt_text).tolist()
        prompt = build_multimodal_prompt([words[: prompt_text // 2], video, words[prompt_text // 2:]], ids)
        out.append(Sample(prompt, tuple(rng.integers(1, n_words, answer).tolist())))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.json"))
    ap.add_argument("--lm", nargs="+", default=["tiny", "6x384", "8x512"])
    ap.add_argument("--visual-tokens", nargs="+", type=int, default=[128, 512])
    ap.add_argument("--side", type=int, default=112, help="frame side in pixels (multiple of 28)")
    ap.add_argument("--text", type=int, default=100, help="text tokens per sample (prompt + markers + answer)")
    ap.add_argument("--answer", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(RESULTS / "target_train_step.jsonl"))
    args = ap.parse_args(argv)

    import jax  # noqa: PLC0415

    from sparrow_jax.training.target_trainer import TargetTrainer  # noqa: PLC0415
    from sparrow_jax.training.trainer import TrainConfig  # noqa: PLC0415

    env = environment()
    print(json.dumps(env))
    base = json.loads(Path(args.config).read_text())
    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp(prefix="target_step_"))
    for lm in args.lm:
        cfg_path = tmp / f"{lm}.json"
        cfg_path.write_text(json.dumps(lm_config(base, lm)))
        for V in args.visual_tokens:
            cfg = TrainConfig.from_file_and_overrides(None, [
                "task=target", f"target_config={cfg_path}", f"out_dir={tmp / 'run'}", f"max_text={args.text}",
                f"global_batch={args.batch}", "tensorboard=false", "steps=1000"])
            from sparrow_jax.models import registry  # noqa: PLC0415

            model_cfg = registry.config_from_dict(json.loads(cfg_path.read_text()))
            tr = TargetTrainer(cfg, samples=samples_for(model_cfg, V, args.side, args.text, args.answer,
                                                        args.batch, rng))
            n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tr.params))
            n_vision = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tr.params["visual"]))

            def one():
                batch = tr.next_batch()
                t0 = time.perf_counter()
                out = tr._step_fn(tr.params, tr.opt_state, tr.tparams, tr.rng, batch)
                jax.block_until_ready(out)
                tr.params, tr.opt_state = out[0], out[1]
                return time.perf_counter() - t0

            load0 = os.getloadavg()[0]
            compile_s = one()
            times = [one() for _ in range(args.repeats)]
            med = float(np.median(times))
            rec = {**env, "lm": lm, "params_M": round(n_params / 1e6, 2), "vision_params_M": round(n_vision / 1e6, 2),
                   "visual_tokens": V, "patches": V * 4, "text_tokens": args.text, "batch": args.batch,
                   "dtype": "float32", "step_s": round(med, 4), "s_per_sample": round(med / args.batch, 4),
                   "first_call_s": round(compile_s, 2), "times_s": [round(t, 4) for t in times],
                   "loadavg_start": round(load0, 2), "loadavg_end": round(os.getloadavg()[0], 2)}
            write_jsonl(args.out, rec)
            print(f"{lm:>6} ({rec['params_M']} M params)  V={V:4d}  B={args.batch}  step {med:.3f} s  "
                  f"{rec['s_per_sample']:.3f} s/sample  (first call {compile_s:.1f} s, load {load0:.1f}->"
                  f"{rec['loadavg_end']:.1f})", flush=True)


if __name__ == "__main__":
    main()

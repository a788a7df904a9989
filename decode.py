"""Generate answers about videos/images with a Qwen2.5-VL target (JAX).

With no arguments it runs the project's small default: a random-initialised target of the shipped
tiny architecture (configs/tiny.json) on a procedurally generated video — a smoke run of the whole
pipeline (video decode -> patches -> vision tower -> prefill -> jitted generation loop) that needs no
download. Point --target at a HF checkpoint directory to run a real model.

  python decode.py
  python decode.py --target ~/ckpt/Qwen2.5-VL-7B-Instruct --video a.mp4 --prompt "What happens?" --dtype bfloat16
  python decode.py --video a.mp4 --prompt "Describe." --video b.mp4 --prompt "Count the objects." --jsonl out.jsonl

Speculative modes (Sparrow draft) arrive with the engine; today --mode ar is the baseline decoder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_argument_group("model")
    src.add_argument("--target", help="HF Qwen2.5-VL checkpoint directory (config.json + safetensors)")
    src.add_argument("--config", default=str(ROOT / "configs" / "tiny.json"),
                     help="architecture for a random-initialised target when --target is not given")
    src.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                     help="parameter/compute dtype (CPU: float32 is much faster)")
    inp = ap.add_argument_group("inputs (one row per --prompt; --video/--image attach to prompts in order)")
    inp.add_argument("--prompt", action="append", help="question text; repeat for a batch")
    inp.add_argument("--video", action="append", default=[], help="video file (mp4/webm/mkv); repeatable")
    inp.add_argument("--image", action="append", default=[], help="image file; repeatable")
    inp.add_argument("--fps", type=float, default=2.0, help="video sampling rate (frames per second)")
    inp.add_argument("--max-frames", type=int, default=768)
    inp.add_argument("--max-pixels", type=int, default=None, help="per-frame pixel budget (Qwen resize rule)")
    gen = ap.add_argument_group("generation")
    gen.add_argument("--mode", choices=["ar"], default="ar", help="decoding mode")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--attention", choices=["xla"], default="xla", help="attention implementation")
    ap.add_argument("--jsonl", help="append one JSON line per row with tokens, text and timings")
    return ap.parse_args(argv)


def build_prompts(args, cfg, codec, workdir):
    from sparrow_jax.io.text import QWEN_ASSISTANT_PREFIX, QWEN_USER_PREFIX  # noqa: PLC0415
    from sparrow_jax.io.vision_inputs import (  # noqa: PLC0415
        VisionPreprocessConfig, VisionTokenIds, build_multimodal_prompt, preprocess_image, preprocess_video)
    from sparrow_jax.synthetic.video import demo_video  # noqa: PLC0415

    prompts_text = args.prompt or ["What is moving in this video?"]
    videos = list(args.video)
    if not args.prompt and not videos and not args.image:
        path, scene = demo_video(Path(workdir) / "demo.mp4", seed=args.seed)
        print(f"[decode] no inputs given: generated {path.name} with {len(scene)} moving object(s)")
        videos = [str(path)]
    vcfg = VisionPreprocessConfig.for_video(fps=args.fps, max_frames=args.max_frames,
                                            **({"max_pixels": args.max_pixels} if args.max_pixels else {}))
    icfg = VisionPreprocessConfig(**({"max_pixels": args.max_pixels} if args.max_pixels else {}))
    visuals = [preprocess_video(v, vcfg) for v in videos] + [preprocess_image(i, icfg) for i in args.image]
    if len(visuals) > len(prompts_text):
        prompts_text += [prompts_text[-1]] * (len(visuals) - len(prompts_text))
    ids = VisionTokenIds(cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.image_token_id, cfg.video_token_id)
    out = []
    for i, text in enumerate(prompts_text):
        segs = [codec.encode(QWEN_USER_PREFIX)]
        if i < len(visuals):
            segs.append(visuals[i])
        segs.append(codec.encode(text + QWEN_ASSISTANT_PREFIX))
        out.append(build_multimodal_prompt(segs, ids))
    return prompts_text, out


def main(argv=None):
    args = parse_args(argv)
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from sparrow_jax.decoding.autoregressive import ar_generate, cache_capacity  # noqa: PLC0415
    from sparrow_jax.decoding.sampling import SamplingParams  # noqa: PLC0415
    from sparrow_jax.io.hf_checkpoint import CheckpointError, load_qwen2_5_vl  # noqa: PLC0415
    from sparrow_jax.io.text import load_codec  # noqa: PLC0415
    from sparrow_jax.io.vision_inputs import VisionInputError  # noqa: PLC0415
    from sparrow_jax.models import target as tg  # noqa: PLC0415
    from sparrow_jax.models.qwen2_5_vl import ConfigError, Qwen25VL, Qwen25VLConfig, prepare_prefill_batch  # noqa: PLC0415

    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    try:
        sampling = SamplingParams(args.temperature, args.top_p, args.top_k)
        if args.target:
            model = load_qwen2_5_vl(args.target, dtype=dtype)
            source = args.target
        else:
            cfg = Qwen25VLConfig.from_hf_dict(json.loads(Path(args.config).read_text()), source=args.config)
            model = Qwen25VL(cfg, rngs=nnx.Rngs(args.seed), dtype=dtype)
            source = f"random init of {args.config} (no trained weights shipped yet)"
        cfg = model.cfg
        codec = load_codec(args.target, cfg.text.vocab_size)
        with tempfile.TemporaryDirectory() as workdir:
            texts, prompts = build_prompts(args, cfg, codec, workdir)
    except (CheckpointError, ConfigError, VisionInputError, ValueError, OSError) as e:
        sys.exit(f"decode.py: error: {e}")
    print(f"[decode] target: {source}\n[decode] tokenizer: {codec.name}\n[decode] backend: {jax.default_backend()}, "
          f"dtype {args.dtype}, batch {len(prompts)}")

    graphdef, params = nnx.split(model)
    t0 = time.perf_counter()
    batch = prepare_prefill_batch(prompts, cfg)
    T = batch.input_ids_BT.shape[1]
    t_host = time.perf_counter() - t0
    t0 = time.perf_counter()
    pre = tg.prefill(graphdef, params, batch, capacity=cache_capacity(T, args.max_new_tokens),
                     m_star=cfg.num_layers // 2, impl=args.attention)
    jax.block_until_ready(pre)
    t_prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = ar_generate(graphdef, params, pre.cache, pre.last_logits_BV, pre.rope_delta_B, jax.random.key(args.seed),
                      max_new_tokens=args.max_new_tokens, sampling=sampling, eos_ids=tuple(cfg.eos_token_ids),
                      impl=args.attention)
    jax.block_until_ready(res)
    t_decode = time.perf_counter() - t0
    toks, n = np.asarray(res.tokens_BM), np.asarray(res.num_tokens_B)
    print(f"[decode] prompt bucket {T} tokens; host prep {t_host:.2f}s, prefill {t_prefill:.2f}s, "
          f"decode {t_decode:.2f}s ({int(n.sum())} tokens; first call includes compilation)")
    for b, text in enumerate(texts):
        ids = toks[b, :n[b]].tolist()
        answer = codec.decode(ids)
        nvis = int(batch.vis_len_B[b])
        print(f"\n[{b}] Q: {text}  ({len(prompts[b].input_ids)} prompt tokens, {nvis} visual)\n[{b}] A: {answer!r}"
              f"\n[{b}] ids: {ids}")
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps({"row": b, "prompt": text, "mode": args.mode, "tokens": ids, "text": answer,
                                    "prompt_tokens": len(prompts[b].input_ids), "visual_tokens": nvis,
                                    "prefill_s": t_prefill, "decode_s": t_decode, "target": source}) + "\n")


if __name__ == "__main__":
    main()

"""Peak memory and time of one long-video prefill (vision tower + LM, blockwise attention).

Builds a random target from a config (default: configs/tiny.json), a synthetic video of the requested
number of visual tokens (random pixels, already patchified: this measures the model, not decoding),
and runs `target.prefill` once to compile and `--repeats` times to time it. Peak RSS is the whole
process's high-water mark (compile included).

  python bench/prefill_memory.py --visual-tokens 16384
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, peak_rss_gib, write_jsonl  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(Path(__file__).resolve().parent.parent / "configs" / "tiny.json"))
    ap.add_argument("--visual-tokens", type=int, default=16384, help="merged visual tokens (after 2x2 merge)")
    ap.add_argument("--frame-side", type=int, default=448, help="frame side in pixels (multiple of 28)")
    ap.add_argument("--text-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--jsonl", default=str(Path(__file__).resolve().parent / "results" / "prefill_memory.jsonl"))
    args = ap.parse_args(argv)

    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from sparrow_jax.models import target as tg  # noqa: PLC0415
    from sparrow_jax.models.qwen2_5_vl import Qwen25VL, Qwen25VLConfig, prepare_prefill_batch  # noqa: PLC0415

    cfg = Qwen25VLConfig.from_hf_dict(json.loads(Path(args.config).read_text()))
    v = cfg.vision
    side = args.frame_side // (v.patch_size * v.spatial_merge_size) * v.spatial_merge_size  # patches per side
    per_group = (side // v.spatial_merge_size) ** 2
    groups = max(1, args.visual_tokens // per_group)
    grid = (groups, side, side)
    n_vis = groups * per_group
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((groups * side * side, v.patch_dim), dtype=np.float32)
    visual = types.SimpleNamespace(kind="video", pixel_values=pixels, grid_thw=grid, second_per_grid_t=1.0)
    half = args.text_tokens // 2
    text = rng.integers(0, 1000, args.text_tokens).tolist()
    ids = text[:half] + [cfg.vision_start_token_id] + [cfg.video_token_id] * n_vis + [cfg.vision_end_token_id] + text[half:]
    types_ = [0] * (half + 1) + [2] * n_vis + [0] * (1 + args.text_tokens - half)
    prompt = types.SimpleNamespace(input_ids=np.asarray(ids), mm_token_type_ids=np.asarray(types_), visuals=(visual,))
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    model = Qwen25VL(cfg, rngs=nnx.Rngs(0), dtype=dtype)
    graphdef, params = nnx.split(model)
    batch = prepare_prefill_batch([prompt], cfg, dtype=np.float32)
    del pixels, visual, prompt
    T = batch.input_ids_BT.shape[1]
    rss_before = peak_rss_gib()
    m_star = tg.default_m_star(cfg.num_layers)
    run = lambda: tg.prefill(graphdef, params, batch, capacity=T + 256, m_star=m_star)  # noqa: E731
    t0 = time.perf_counter()
    jax.block_until_ready(run())
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - t0)
    rec = {
        "bench": "prefill_memory", **environment(), "config": Path(args.config).name, "dtype": args.dtype,
        "visual_tokens": n_vis, "patches": int(batch.pixels_PC.shape[0]), "grid_thw": grid, "seq_len": int(T),
        "first_call_s (compile+run)": round(first, 2), "prefill_s": round(min(times), 3) if times else None,
        "peak_rss_gib_before_prefill": round(rss_before, 2), "peak_rss_gib": round(peak_rss_gib(), 2),
    }
    print(json.dumps(rec, indent=2))
    write_jsonl(args.jsonl, rec)


if __name__ == "__main__":
    main()

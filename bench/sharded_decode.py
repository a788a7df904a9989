"""Compile time and per-round time of sharded decoding vs one device (issue 12 §2), on whatever devices
this process has. On CPU it is a correctness check of the sharded programs, not a speed claim: the 8
"devices" are threads of one host sharing its cores, and every all-reduce is a memory copy.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python bench/sharded_decode.py --mesh data=1,tensor=8

For each placement (one device, then each --mesh) one SpecDecoder (a tiny random Qwen2.5-VL target:
8 heads, 8 KV heads, random draft) decodes a 2-row text batch twice in AR and Sparrow mode: compile
= first call - second call (prefill + loop), per round = second call's loop time / rounds. Tokens
must equal the one-device run's."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

import _tiny  # noqa: E402
from common import environment  # noqa: E402
from sparrow_jax import api  # noqa: E402

CONFIG = _tiny.hf_config_dict(text={"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 8,
                                    "num_key_value_heads": 8,
                                    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                        "mrope_section": [4, 6, 6]}}, vision={"out_hidden_size": 256})
QUESTIONS = ["What moves in the scene?", "Describe the colours."]


def measure(dec, mesh, mode, max_new):
    cfg = api.DecodeConfig(mode=mode, tree="chain3", max_new_tokens=max_new, mesh=mesh)
    prompts = dec.processor(QUESTIONS, None, None, cfg.vision)
    first, second = dec.run(prompts, cfg), dec.run(prompts, cfg)
    rounds = int((second.accepted_BR > 0).any(0).sum()) if second.accepted_BR is not None else max_new
    return {"mesh": mesh or "one device", "mode": mode,
            "compile_s": (first.prefill_s + first.decode_s) - (second.prefill_s + second.decode_s),
            "prefill_s": second.prefill_s, "decode_s": second.decode_s, "rounds": rounds,
            "ms_per_round": 1e3 * second.decode_s / rounds,
            "tokens": second.tokens_BM.tolist()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mesh", action="append", default=[], help="a mesh to compare with one device (repeatable)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    print(json.dumps(environment()))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "config.json"
        path.write_text(json.dumps(CONFIG))
        processor = api.Processor.from_config(path)
        target = _tiny.random_model(processor.cfg, seed=0)
        dec = api.SpecDecoder(processor, target)
        ref = {}
        for mesh in [None, *args.mesh]:
            for mode in ("ar", "sparrow"):
                r = measure(dec, mesh, mode, args.max_new_tokens)
                ref.setdefault(mode, r["tokens"])
                r["tokens_equal_one_device"] = r.pop("tokens") == ref[mode]
                print(json.dumps(r), flush=True)
                assert r["tokens_equal_one_device"], r


if __name__ == "__main__":
    main()

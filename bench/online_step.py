"""Online draft training split over devices: the frozen target's forward inside the step, rows over the
data axes, its parameters placed by their declared axes (sharding.RULES).

Builds, on the same synthetic samples and the same target, an offline trainer (features extracted
first) and an online one (the target runs in the step), and runs both for --steps steps on the mesh.
Prints one JSON line: the per-step losses of both, the input shardings the compiled online step takes
for the target's inputs and parameters, the shapes of the compiled program's [rows, T, ...] values
(the target's activations), and the median time of an online step (its host batch building included)
and of the host batch building alone, and the CPU time of a step (all threads: on a shared machine the
work done, where wall time also counts the waiting).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python bench/online_step.py --mesh 8,1,1
  python bench/online_step.py --mesh 1,1,1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment  # noqa: E402

from sparrow_jax.synthetic.samples import synthetic_samples  # noqa: E402
from sparrow_jax.training.features import extract_features  # noqa: E402
from sparrow_jax.training.trainer import TrainConfig, Trainer, load_target  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _spec(sharding) -> str:
    return str(getattr(sharding, "spec", sharding))


def _path(path) -> str:
    return ".".join(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mesh", default="1,1,1", help="data,fsdp,tensor")
    ap.add_argument("--target-config", default=str(ROOT / "configs" / "tiny.json"))
    ap.add_argument("--text-vocab", type=int, default=None, help="synthetic text ids below this")
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--max-text", type=int, default=32)
    ap.add_argument("--max-visual", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2, help="steps compared online vs offline")
    ap.add_argument("--repeats", type=int, default=0, help="timed online steps after those")
    args = ap.parse_args()
    mesh = tuple(int(x) for x in args.mesh.split(","))
    if int(np.prod(mesh)) != jax.device_count():
        raise SystemExit(f"--mesh {args.mesh} needs {int(np.prod(mesh))} devices, {jax.device_count()} present "
                         "(XLA_FLAGS=--xla_force_host_platform_device_count=N on CPU)")
    B = args.global_batch
    n = B * (args.steps + args.repeats + 2)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(target_config=args.target_config, target_seed=7, online=True, max_text=args.max_text,
                          max_visual=args.max_visual, m_star=1, global_batch=B, lr=3e-3, warmup=2,
                          steps=args.steps + args.repeats + 2, mesh=mesh, out_dir=str(Path(tmp) / "run"),
                          tensorboard=False)
        target = load_target(cfg)
        samples = synthetic_samples(target.cfg, n, seed=2, text_vocab=args.text_vocab)
        out = {"mesh": mesh, "global_batch": B, "devices": jax.device_count(), "losses": {}}
        if args.steps:
            extract_features(target, samples[:B * args.steps], Path(tmp) / "feats", spec=cfg.feature_spec(1),
                             batch_size=B, shard_size=B * args.steps, progress=False)
            off = Trainer(dataclasses.replace(cfg, online=False, features=str(Path(tmp) / "feats"),
                                              num_samples=B * args.steps), target=target)
            on = Trainer(cfg, samples=samples[:B * args.steps], target=target)
            for name, tr in (("offline", off), ("online", on)):
                losses = []
                with jax.set_mesh(tr.mesh):
                    for s in range(args.steps):
                        batch = tr.next_batch()
                        step = tr._step_fn
                        if name == "online" and s == 0:  # the first step runs the program inspected
                            step = tr.lower_step(batch).compile()
                            out.update(_compiled_facts(step, batch))
                        tr.params, tr.opt_state, tr.rng, m = step(tr.params, tr.opt_state, tr.tparams, tr.rng, batch)
                        losses.append({k: float(v) for k, v in jax.device_get(m).items()})
                out["losses"][name] = losses
        if args.repeats:
            timed = Trainer(dataclasses.replace(cfg, steps=args.repeats + 2), samples=samples, target=target)
            step_s, host_s, cpu_s = [], [], []
            with jax.set_mesh(timed.mesh):
                for i in range(args.repeats + 2):  # 2 warm-up calls: the second one compiles again (rng sharding)
                    t0, c0 = time.perf_counter(), time.process_time()
                    batch = timed.next_batch()
                    t1 = time.perf_counter()
                    timed.params, timed.opt_state, timed.rng, m = timed._step_fn(
                        timed.params, timed.opt_state, timed.tparams, timed.rng, batch)
                    jax.block_until_ready(m)
                    if i >= 2:
                        step_s.append(time.perf_counter() - t0)
                        cpu_s.append(time.process_time() - c0)
                        host_s.append(t1 - t0)
            out["step_s_median"] = float(np.median(step_s))
            out["step_cpu_s_median"] = float(np.median(cpu_s))  # every thread: the work, not the waiting
            out["host_batch_s_median"] = float(np.median(host_s))
            out["env"] = environment()
    print(json.dumps(out))


def _compiled_facts(compiled, batch) -> dict:
    """What the compiled online step takes and computes: input shardings of the target's inputs
    (prefill) and parameters, and the (per-device) shapes of its values with the target's length T."""
    args_shardings = compiled.input_shardings[0]
    prefill = {_path(p): _spec(s) for p, s in
               jax.tree_util.tree_flatten_with_path(args_shardings[4].prefill)[0]}
    tparams = {_path(p): _spec(s) for p, s in jax.tree_util.tree_flatten_with_path(args_shardings[2])[0]}
    T = batch.prefill.input_ids_BT.shape[1]
    shapes = sorted({m.group(1) for m in re.finditer(r"\b(?:f32|bf16|s32|pred)\[([0-9,]+)\]", compiled.as_text())
                     if str(T) in m.group(1).split(",")})
    return {"prefill_shardings": prefill, "target_param_shardings": tparams, "T": T, "shapes_with_T": shapes}


if __name__ == "__main__":
    main()

"""Shared benchmark plumbing: a header with command/machine/date/versions/commit, and JSON-lines output."""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def environment() -> dict:
    """The run's command, machine, date, versions and commit. On the CPU backend it also pins XLA:CPU's
    worker threads one per core (`sparrow_jax.runtime.pin_cpu_workers`, as `SpecDecoder` does, so a
    benchmark times what decode.py runs; SPARROW_JAX_PIN_THREADS=0 turns it off) and records how many
    were pinned: benchmarks call it before their first timed run."""
    import jax  # noqa: PLC0415
    import flax  # noqa: PLC0415

    from sparrow_jax import runtime  # noqa: PLC0415

    return {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform(terse=True)}",
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__,
        "flax": flax.__version__,
        "python": platform.python_version(),
        "commit": _commit(),
        "cpu_workers_pinned": len(runtime.pin_cpu_workers()),
    }


def _commit() -> str | None:
    """The checkout measured: short commit, '+dirty' with uncommitted changes to tracked files; None outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def median_time(fn, repeats: int) -> float:
    """Median wall seconds of `fn()` (its result blocked on) over `repeats` calls after one compile/warm-up call."""
    import jax  # noqa: PLC0415

    jax.block_until_ready(fn())
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def write_jsonl(path, record: dict) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl_by_key(path, key) -> dict:
    """The records of a JSON-lines file (none if it does not exist) by `key(record)`; a later line with
    the same key wins (a re-run replaces its earlier result). The resume store of the benches."""
    out = {}
    p = Path(path)
    if p.is_file():
        for line in p.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                out[key(r)] = r
    return out


def parse_draft_args(ap, draft_specs, random_specs, known) -> dict:
    """`--draft NAME=DIR` (repeatable) and `--random-draft NAME[,NAME]` -> {name: Path or None (random)};
    NAME is a method of `known` or METHOD:LABEL (another draft of that method, e.g. an ablation); a usage error (ap.error) for a malformed spec, a name not in `known`, or a DIR without config.json."""
    drafts = {}
    for spec in draft_specs:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            ap.error(f"--draft {spec!r}: expected NAME=DIR, e.g. sparrow=shipped/drafts/sparrow")
        drafts[name] = Path(path)
    for spec in random_specs:
        drafts.update({name: None for name in spec.split(",") if name})
    for name, path in drafts.items():
        if name.partition(":")[0] not in known or name.endswith(":"):
            ap.error(f"method {name!r}: expected one of {known}, optionally labelled as NAME:LABEL "
                     "(e.g. sparrow:mtp_only for an ablation draft)")
        if path is not None and not (path / "config.json").is_file():
            ap.error(f"--draft {name}={path}: no config.json there (a draft checkpoint directory is expected)")
    return drafts


def _proc_status_kib(field: str, pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rss_gib(pid: int | str = "self") -> float:
    """Current resident set size (Linux /proc VmRSS)."""
    return _proc_status_kib("VmRSS", pid) / 2**20


def window_peak_rss_gib() -> float:
    """Peak RSS since the last `reset_peak_rss()` (VmHWM)."""
    return _proc_status_kib("VmHWM") / 2**20


def reset_peak_rss() -> None:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0: clear_refs 5), so a stage's own
    peak can be read with `window_peak_rss_gib()`."""
    Path("/proc/self/clear_refs").write_text("5")

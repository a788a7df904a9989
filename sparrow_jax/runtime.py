"""What a decoding process does around its compiled programs: XLA:CPU's intra-op worker threads pinned one
per CPU, and jitted entry points whose model GraphDef is hashed once (`graph_jit`).

Why: XLA:CPU runs a program's ops on a pool of worker threads (one per CPU the process may use) while the
calling thread waits. When the process has been idle (between requests, or the 0.3 s of rest a benchmark
takes before each timed run), Linux wakes the sleeping workers onto the waker's CPU and takes tens of
milliseconds to spread them again, so a whole short call runs on one core: the tiny target's LM prefill
at 8 s of video measured 35-38 ms after 50-300 ms of idle against 21-24 ms back to back, with the
process's CPU time equal to its wall time (one core busy). Pinned one per CPU, the same call ran in
21-23 ms either way; the whole 8 s prefill 50-58 -> 37-40 ms (BENCHMARKS.md, "Prefill after idle"). Serving stacks do the same (vLLM's CPU backend binds
its OpenMP threads to cores by default).

`pin_cpu_workers()` is called by `SpecDecoder` (so decode.py) and the benchmarks on the CPU backend;
`SPARROW_JAX_PIN_THREADS=0` turns it off (e.g. a process sharing its CPUs with other busy processes,
where a pinned worker cannot move away from a busy core). Linux only; elsewhere it does nothing.
"""

from __future__ import annotations

import collections
import functools
import inspect
import os
import threading
from pathlib import Path

import jax

PIN_ENV = "SPARROW_JAX_PIN_THREADS"
# XLA:CPU's intra-op pool (an Eigen thread pool named "XLAEigen"; Linux shows the first 15 bytes of
# "tf_XLAEigen" as the thread's comm).
WORKER_THREAD_NAME = "tf_XLAEigen"
_TASKS = Path("/proc/self/task")


def cpu_worker_threads() -> list[int]:
    """Thread ids of XLA:CPU's intra-op workers in this process (creating the CPU client if needed);
    [] where threads cannot be listed (not Linux)."""
    jax.devices("cpu")  # the pool is created with the client
    if not _TASKS.is_dir():
        return []
    tids = []
    for task in _TASKS.iterdir():
        try:
            if (task / "comm").read_text().strip() == WORKER_THREAD_NAME:
                tids.append(int(task.name))
        except OSError:  # the thread exited while we listed
            continue
    return sorted(tids)


def worker_affinity() -> dict[int, list[int]]:
    """{worker thread id: the CPUs it may run on}, to check or report the pinning."""
    out = {}
    for tid in cpu_worker_threads():
        try:
            out[tid] = sorted(os.sched_getaffinity(tid))
        except OSError:
            continue
    return out


def pin_enabled() -> bool:
    return os.environ.get(PIN_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def pin_cpu_workers(cpus=None) -> dict[int, int]:
    """Pin XLA:CPU's intra-op workers round-robin over `cpus` (default: the CPUs this process may use),
    one CPU each; {thread id: CPU} of the workers pinned. Does nothing ({}) when turned off by
    SPARROW_JAX_PIN_THREADS=0, where the default backend is not the CPU, where threads cannot be pinned
    (not Linux), or with fewer than 2 CPUs to spread over. Calling it again re-applies the same map."""
    if not pin_enabled() or jax.default_backend() != "cpu" or not hasattr(os, "sched_setaffinity"):
        return {}
    allowed = sorted(os.sched_getaffinity(os.getpid()) if cpus is None else cpus)
    if len(allowed) < 2:
        return {}
    pinned = {}
    for i, tid in enumerate(cpu_worker_threads()):
        cpu = allowed[i % len(allowed)]
        try:
            os.sched_setaffinity(tid, {cpu})
        except OSError:  # the thread exited, or the CPU is not ours to use
            continue
        pinned[tid] = cpu
    return pinned


def release_cpu_workers() -> int:
    """Undo `pin_cpu_workers`: every worker may run on all of the process's CPUs again; how many."""
    if not hasattr(os, "sched_setaffinity"):
        return 0
    allowed, n = os.sched_getaffinity(os.getpid()), 0
    for tid in cpu_worker_threads():
        try:
            os.sched_setaffinity(tid, allowed)
            n += 1
        except OSError:
            continue
    return n


# ---------------------------------------------------------------------------------------------------------
# Jitted entry points over nnx GraphDefs. A GraphDef is a static argument, and jax hashes static arguments on
# every call; flax's GraphDef.__hash__ rebuilds and hashes its whole node list each time (1.4-1.6 ms for the
# tiny target, more for a 7B one), paid by every prefill, vision chunk and decode-loop call. `graph_jit`
# hands jax a `StaticGraph` instead: the same GraphDef, hashed once per GraphDef object.


class StaticGraph:
    """A GraphDef as a jit static argument, its hash computed once. Equal to another StaticGraph of an equal
    GraphDef (so separate `nnx.split`s of one model share compiled programs, as plain GraphDefs do)."""

    __slots__ = ("graphdef", "_hash")

    def __init__(self, graphdef):
        self.graphdef, self._hash = graphdef, hash(graphdef)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return isinstance(other, StaticGraph) and (
            other.graphdef is self.graphdef or (other._hash == self._hash and other.graphdef == self.graphdef))

    def __repr__(self) -> str:
        return f"StaticGraph(hash={self._hash})"


_INTERNED: collections.OrderedDict[int, StaticGraph] = collections.OrderedDict()
_INTERNED_MAX = 64
_INTERNED_LOCK = threading.Lock()


def static_graph(graphdef) -> StaticGraph:
    """The StaticGraph of a GraphDef object, made once per object (kept for the last 64 objects; the entry
    holds the object, so its id cannot be reused while cached)."""
    if isinstance(graphdef, StaticGraph):
        return graphdef
    with _INTERNED_LOCK:
        hit = _INTERNED.get(id(graphdef))
        if hit is not None and hit.graphdef is graphdef:
            _INTERNED.move_to_end(id(graphdef))
            return hit
    made = StaticGraph(graphdef)
    with _INTERNED_LOCK:
        _INTERNED[id(graphdef)] = made
        while len(_INTERNED) > _INTERNED_MAX:
            _INTERNED.popitem(last=False)
    return made


def graph_jit(*, graphs: tuple[str, ...], static_argnames: tuple[str, ...] = (), donate_argnames=()):
    """`jax.jit` for a function whose arguments named in `graphs` are nnx GraphDefs (static): callers pass
    GraphDefs (or StaticGraphs), jax sees StaticGraphs, the function body sees the GraphDefs. The result
    keeps jit's `lower`, `trace`, `eval_shape` and `_cache_size`."""
    assert set(graphs) <= set(static_argnames), (graphs, static_argnames)

    def decorate(fn):
        names = list(inspect.signature(fn).parameters)
        slots = [(names.index(g), g) for g in graphs]

        def convert(args, kwargs, to):
            args = list(args)
            for i, name in slots:
                if i < len(args):
                    args[i] = to(args[i])
                elif name in kwargs:
                    kwargs = {**kwargs, name: to(kwargs[name])}
            return args, kwargs

        def unwrap(g):
            return g.graphdef if isinstance(g, StaticGraph) else g

        @functools.wraps(fn)
        def traced(*args, **kwargs):
            args, kwargs = convert(args, kwargs, unwrap)
            return fn(*args, **kwargs)

        jitted = jax.jit(traced, static_argnames=static_argnames, donate_argnames=donate_argnames)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            args, kwargs = convert(args, kwargs, static_graph)
            return jitted(*args, **kwargs)

        def staged(method):
            def run(*args, **kwargs):
                args, kwargs = convert(args, kwargs, static_graph)
                return method(*args, **kwargs)
            return run

        call.lower, call.trace, call.eval_shape = (staged(jitted.lower), staged(jitted.trace),
                                                   staged(jitted.eval_shape))
        call._cache_size, call.jitted = jitted._cache_size, jitted
        return call

    return decorate

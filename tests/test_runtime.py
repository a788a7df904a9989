"""sparrow_jax.runtime: XLA:CPU's worker threads pinned one per CPU, and unpinned again."""

import os
import sys

import jax
import pytest

from sparrow_jax import runtime

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or jax.default_backend() != "cpu",
                                reason="thread pinning is Linux + CPU backend only")


def test_workers_are_found():
    # If XLA renames its pool threads, pinning would silently stop: fail here instead.
    assert runtime.cpu_worker_threads(), f"no threads named {runtime.WORKER_THREAD_NAME!r} in this process"


@pytest.mark.skipif(len(os.sched_getaffinity(os.getpid())) < 2, reason="needs 2 CPUs to spread over")
def test_pin_spreads_workers_one_per_cpu_and_release_undoes_it():
    allowed = sorted(os.sched_getaffinity(os.getpid()))
    try:
        pinned = runtime.pin_cpu_workers()
        workers = runtime.cpu_worker_threads()
        assert sorted(pinned) == workers
        for tid, cpu in pinned.items():
            assert os.sched_getaffinity(tid) == {cpu}
        cpus = list(pinned.values())
        # round-robin: as many distinct CPUs as there are workers, up to the CPUs allowed
        assert len(set(cpus)) == min(len(workers), len(allowed))
        assert runtime.worker_affinity() == {tid: [cpu] for tid, cpu in pinned.items()}
        assert runtime.pin_cpu_workers() == pinned  # idempotent
        # the pinned workers still compute correctly
        x = jax.numpy.arange(1 << 16, dtype=jax.numpy.float32)
        assert float(jax.jit(lambda v: (v * 2).sum())(x)) == float(x.sum()) * 2
    finally:
        assert runtime.release_cpu_workers() == len(runtime.cpu_worker_threads())
    for tid in runtime.cpu_worker_threads():
        assert sorted(os.sched_getaffinity(tid)) == allowed


def test_env_switch_turns_pinning_off(monkeypatch):
    for off in ("0", "false", "off"):
        monkeypatch.setenv(runtime.PIN_ENV, off)
        assert runtime.pin_cpu_workers() == {}
    monkeypatch.setenv(runtime.PIN_ENV, "1")
    assert runtime.pin_enabled()
    runtime.release_cpu_workers()


def test_single_cpu_pins_nothing():
    assert runtime.pin_cpu_workers(cpus=[0]) == {}


# --------------------------------------------------------------------------------- graph_jit / StaticGraph


def _tiny_module():
    from flax import nnx

    class Affine(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, x):
            return self.lin(x) * 2.0

    return Affine(nnx.Rngs(0))


@runtime.graph_jit(graphs=("graphdef",), static_argnames=("graphdef", "scale"))
def _apply(graphdef, params, x, *, scale: float = 1.0):
    from flax import nnx

    assert not isinstance(graphdef, runtime.StaticGraph)  # the body sees the GraphDef itself
    return nnx.merge(graphdef, params)(x) * scale


def test_graph_jit_matches_the_module_and_hashes_each_graphdef_once(monkeypatch):
    from flax import nnx

    model = _tiny_module()
    x = jax.numpy.arange(8.0).reshape(2, 4)
    g, p = nnx.split(model)
    expected = model(x) * 3.0
    calls = []
    cls = type(g)
    original = cls.__hash__
    monkeypatch.setattr(cls, "__hash__", lambda self: calls.append(1) or original(self))
    for _ in range(5):
        assert jax.numpy.allclose(_apply(g, p, x, scale=3.0), expected)
    assert len(calls) <= 1, f"GraphDef hashed {len(calls)} times over 5 calls"
    # a second split of the same model, and a StaticGraph: the same compiled program
    before = _apply._cache_size()
    g2, p2 = nnx.split(model)
    assert g2 is not g
    assert jax.numpy.allclose(_apply(g2, p2, x, scale=3.0), expected)
    assert jax.numpy.allclose(_apply(runtime.static_graph(g), p, x, scale=3.0), expected)
    assert _apply._cache_size() == before
    assert jax.numpy.allclose(_apply(graphdef=g2, params=p2, x=x, scale=3.0), expected)  # keywords
    assert "dot_general" in _apply.lower(g, p, x, scale=3.0).as_text()
    assert "dot_general" in _apply.trace(g, p, x, scale=3.0).lower().as_text()
    assert _apply.eval_shape(g, p, x, scale=3.0).shape == expected.shape


def test_static_graph_equality_and_interning():
    from flax import nnx

    model = _tiny_module()
    g1, _ = nnx.split(model)
    g2, _ = nnx.split(model)
    s1, s2 = runtime.static_graph(g1), runtime.static_graph(g2)
    assert runtime.static_graph(g1) is s1  # interned per object
    assert s1 == s2 and hash(s1) == hash(s2)  # equal GraphDefs share compiled programs
    other, _ = nnx.split(nnx.Linear(4, 5, rngs=nnx.Rngs(0)))
    assert runtime.static_graph(other) != s1

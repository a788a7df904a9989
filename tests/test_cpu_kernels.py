"""The compiled CPU decode-attention kernel (`cpu_kernels`): equals the jnp online-softmax partial at every shape
the library gives it (head dims with and without a compiled specialisation, GQA groups, per-row lengths including 0
and the full capacity, caches split over threads), is what the library's decode program really calls on CPU, stays
out of programs exported for a GPU, and reports a missing compiler instead of failing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cpu_kernels
from sparrow_jax.models import attention as attn_lib
from sparrow_jax.models.attention import MaskSpec

pytestmark = pytest.mark.skipif(not cpu_kernels.load()[0], reason=f"CPU kernel unavailable: {cpu_kernels.load()[1]}")


def _partial_reference(q_BKME, k_BSKE, v_BSKE, len_B):
    """The online-softmax partial in plain jnp: (row max, normaliser, unnormalised sum) over keys < len."""
    s = jnp.einsum("bkme,bske->bkms", q_BKME, k_BSKE)
    vis = jnp.arange(k_BSKE.shape[1])[None, None, None, :] < len_B[:, None, None, None]
    s = jnp.where(vis, s, -jnp.inf)
    m = jnp.max(s, axis=-1)
    p = jnp.where(vis, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)[..., None]), 0.0)
    return m, p.sum(-1), jnp.einsum("bkms,bske->bkme", p, v_BSKE)


@pytest.mark.parametrize("B,S,K,M,E,lens", [
    (3, 2500, 2, 2, 64, [2500, 1301, 0]),  # AR on the tiny target: full, ragged (not a block multiple), empty rows
    (1, 4100, 4, 7, 128, [4097]),          # a 7B-shaped GQA group (7 rows per KV head), split over several parts
    (2, 700, 3, 3, 64, [700, 399]),        # 3 rows: register-blocked loops, a 3-row tile
    (1, 1500, 2, 6, 80, [1500]),           # E = 80 (5 lane groups): tiles of 2 rows
    (2, 130, 1, 9, 48, [130, 65]),         # no compiled specialisation for E = 48 (generic loop), one part
    (1, 64, 2, 64, 32, [1]),               # the most rows the kernel takes; a single key
])
def test_kernel_equals_reference(B, S, K, M, E, lens):
    ks = jax.random.split(jax.random.key(S + M), 3)
    q = jax.random.normal(ks[0], (B, K, M, E)) / np.sqrt(E)
    k = jax.random.normal(ks[1], (B, S, K, E)) * 2.0  # sharp softmaxes: the running max matters
    v = jax.random.normal(ks[2], (B, S, K, E))
    len_B = jnp.asarray(lens, jnp.int32)
    got = jax.jit(cpu_kernels.decode_attention_partial)(q, k, v, len_B)
    want = _partial_reference(q, k, v, len_B)
    for g, w, name in zip(got, want, ("m", "l", "acc")):
        assert g.shape == w.shape, name
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=1e-5, err_msg=name)
    empty = np.asarray(lens) == 0
    assert np.all(np.isneginf(np.asarray(got[0])[empty])) and np.all(np.asarray(got[1])[empty] == 0)


def _decode_call(impl):
    """An AR-step-shaped cache read through the library's entry point, jitted with `impl`."""
    B, S, H, K, E = 1, 96, 4, 2, 16
    ks = jax.random.split(jax.random.key(0), 4)
    args = (jax.random.normal(ks[0], (B, 1, H, E)), jax.random.normal(ks[1], (B, S, K, E)),
            jax.random.normal(ks[2], (B, S, K, E)), MaskSpec(kv_len_B=jnp.asarray([70]),
                                                             block_mask_BTN=jnp.ones((B, 1, 1), bool)),
            jax.random.normal(ks[3], (B, 1, K, E)))
    fn = jax.jit(lambda q, k, v, m, blk: attn_lib.attention(q, k, v, m, block_k=blk, block_v=blk, impl=impl))
    return fn, args


def test_library_decode_runs_the_kernel_on_cpu():
    """The default impl's decode program calls the kernel (compiled HLO); cpu_kernel_rows=0 keeps XLA's reads;
    both give the dense answer."""
    fn, args = _decode_call(attn_lib.XLA)
    assert cpu_kernels.TARGET in fn.lower(*args).compile().as_text()
    off_fn, _ = _decode_call(attn_lib.AttentionImpl(cpu_kernel_rows=0))
    assert cpu_kernels.TARGET not in off_fn.lower(*args).compile().as_text()
    q, k, v, mask, blk = args
    ref = attn_lib.dense_attention(q, k, v, mask, block_k=blk, block_v=blk)
    for out in (fn(*args), off_fn(*args)):
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=2e-6)


def test_gpu_export_keeps_the_xla_path():
    """A program exported for CUDA from this CPU machine has no CPU custom call in it (platform_dependent)."""
    fn, args = _decode_call(attn_lib.XLA)
    exported = jax.export.export(fn, platforms=("cuda",))(*args)
    assert cpu_kernels.TARGET not in exported.mlir_module()


def test_missing_compiler_is_reported(monkeypatch, tmp_path):
    """No compiler (or a failing one): load() says why instead of raising; the env switch turns it off."""
    monkeypatch.setenv("SPARROW_JAX_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails
    ok, why = cpu_kernels.load.__wrapped__()
    assert not ok and "build or load failed" in why
    monkeypatch.setenv("SPARROW_JAX_CPU_KERNELS", "0")
    assert cpu_kernels.load.__wrapped__() == (False, "disabled by SPARROW_JAX_CPU_KERNELS=0")

"""Pallas kernels in interpret mode (CPU) against their plain-jnp references over randomised shapes:
batch, heads, GQA ratios, lengths that are not block multiples, per-row lengths, tree masks with
single-visible-key and fully masked rows; fp32 <= 1e-5, bf16 <= 2e-2; prefill gradients (custom VJP,
Pallas backward kernels) against the reference's; dispatch routing and the block-size rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import common as C
from pallas_kernels import dispatch
from pallas_kernels import reference as R
from pallas_kernels.prefill import prefill_attention
from pallas_kernels.tree_verify import tree_verify_attention
from pallas_kernels.vata import vata_attention
from sparrow_jax.models.attention import XLA, AttentionImpl, MaskSpec, attention, dense_attention

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
# jitted references: one compile per shape instead of one per eager op (keeps the suite fast)
vata_ref = jax.jit(R.vata_reference)
prefill_ref = jax.jit(R.prefill_reference, static_argnames="causal")
dense = jax.jit(dense_attention)
GPU_INTERP = C.Backend("gpu", True)
TPU_INTERP = C.Backend("tpu", True)


def _normal(rng, shape, dtype):
    return jnp.asarray(rng.standard_normal(shape).astype(np.float32)).astype(dtype)


def _check(out, ref, dtype):
    out = np.asarray(jnp.asarray(out, jnp.float32))
    ref = np.asarray(jnp.asarray(ref, jnp.float32))
    assert out.shape == ref.shape
    assert np.all(np.isfinite(out))
    err = np.abs(out - ref).max()
    assert err <= TOL[dtype], f"max abs error {err:.3g} > {TOL[dtype]}"
    return err


def cache_block_case(seed, dtype, *, E=None, S=None):
    """Random shapes for the draft/verify kernels. Row 0 of the batch has an empty cache and its
    first query sees only itself (a single visible key); the last query of the last row sees nothing
    at all (fully masked: output 0)."""
    rng = np.random.default_rng(seed)
    B = int(rng.integers(1, 4))
    K = int(rng.choice([1, 2]))
    G = int(rng.choice([1, 2, 3]))
    E = E or int(rng.choice([16, 32]))
    T = int(rng.integers(1, 11))
    S = S or int(rng.integers(20, 150))
    N = T + int(rng.integers(0, 12))  # fed ancestors + this step's nodes
    q = _normal(rng, (B, T, K * G, E), dtype)
    k, v = _normal(rng, (B, S, K, E), dtype), _normal(rng, (B, S, K, E), dtype)
    bk, bv = _normal(rng, (B, N, K, E), dtype), _normal(rng, (B, N, K, E), dtype)
    mask = rng.random((B, T, N)) < 0.3
    mask[:, np.arange(T), N - T + np.arange(T)] = True  # each node sees itself
    lens = rng.integers(1, S + 1, B)
    lens[0] = 0
    mask[0, 0] = False
    mask[0, 0, N - T] = True
    if B > 1:
        lens[-1] = 0
        mask[-1, -1] = False
    return q, k, v, jnp.asarray(lens, jnp.int32), bk, bv, jnp.asarray(mask)


SLOW = pytest.mark.slow


@pytest.mark.parametrize("seed,dtype", [(0, jnp.float32), pytest.param(1, jnp.float32, marks=SLOW),
                                        pytest.param(2, jnp.float32, marks=SLOW), (3, jnp.bfloat16)])
def test_vata_matches_reference(seed, dtype):
    args = cache_block_case(seed, dtype)
    out = vata_attention(*args, block_rows=16, block_kv=16, backend=GPU_INTERP)
    _check(out, vata_ref(*args), dtype)


@pytest.mark.parametrize("seed,dtype", [(10, jnp.float32), pytest.param(11, jnp.float32, marks=SLOW),
                                        pytest.param(12, jnp.float32, marks=SLOW), (13, jnp.bfloat16)])
def test_tree_verify_matches_reference(seed, dtype):
    args = cache_block_case(seed, dtype)
    out = tree_verify_attention(*args, block_rows=16, block_kv=16, chunk=32, backend=GPU_INTERP)
    _check(out, vata_ref(*args), dtype)  # same contract
    q, k, v, lens, bk, bv, mask = args
    if seed == 10:  # the reference encodes the library's dense semantics, incl. exact-zero rows
        lib = dense(q, k, v, MaskSpec(kv_len_B=lens, block_mask_BTN=mask), block_k=bk, block_v=bv)
        _check(vata_ref(*args), lib, dtype)
        assert q.shape[0] > 1 and np.all(np.asarray(out)[-1, -1] == 0)


def prefill_case(seed, dtype, *, causal, segments=False, E=None, T=None):
    rng = np.random.default_rng(seed)
    B = int(rng.integers(1, 4))
    K = int(rng.choice([1, 2]))
    G = int(rng.choice([1, 2, 3]))
    E = E or int(rng.choice([16, 32]))
    T = T or int(rng.integers(5, 60))
    q = _normal(rng, (B, T, K * G, E), dtype)
    k, v = _normal(rng, (B, T, K, E), dtype), _normal(rng, (B, T, K, E), dtype)
    lens = rng.integers(1, T + 1, B)
    lens[0] = T
    if B > 1:
        lens[1] = 1  # a row whose queries all see exactly one key (causal or not)
    seg = None
    if segments:  # frame groups / windows packed in one row: sorted ids, uneven lengths
        seg = jnp.asarray(np.sort(rng.integers(0, 4, (B, T)), axis=1), jnp.int32)
    return q, k, v, jnp.asarray(lens, jnp.int32), seg


# head_dim 24 / 12: not a power of two, zero-padded inside prefill_attention
PREFILL_CASES = [(30, jnp.float32, True, False, None), pytest.param(31, jnp.float32, False, False, 12, marks=SLOW),
                 pytest.param(32, jnp.float32, True, True, None, marks=SLOW), (33, jnp.float32, False, True, 24),
                 (34, jnp.bfloat16, True, False, None)]


@pytest.mark.parametrize("seed,dtype,causal,segments,E", PREFILL_CASES)
def test_prefill_matches_reference(seed, dtype, causal, segments, E):
    q, k, v, lens, seg = prefill_case(seed, dtype, causal=causal, segments=segments, E=E)
    out = prefill_attention(q, k, v, lens, causal=causal, q_segment_ids=seg, kv_segment_ids=seg, block_q=16,
                            block_kv=16, backend=GPU_INTERP)
    ref = prefill_ref(q, k, v, lens, causal=causal, q_segment_ids=seg, kv_segment_ids=seg)
    _check(out, ref, dtype)
    if not segments:
        _check(ref, dense(q, k, v, MaskSpec(kv_len_B=lens, causal=causal)), dtype)


@pytest.mark.parametrize("seed,causal,segments,E", [(40, True, False, None), (41, False, True, 24)])
def test_prefill_gradients_match_reference(seed, causal, segments, E):
    q, k, v, lens, seg = prefill_case(seed, jnp.float32, causal=causal, segments=segments, E=E)
    w = _normal(np.random.default_rng(seed + 100), q.shape, jnp.float32)  # random output cotangent

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * w)

    kern = loss(lambda q, k, v: prefill_attention(q, k, v, lens, causal=causal, q_segment_ids=seg,
                                                  kv_segment_ids=seg, block_q=16, block_kv=16, backend=GPU_INTERP))
    ref = loss(lambda q, k, v: R.prefill_reference(q, k, v, lens, causal=causal, q_segment_ids=seg,
                                                   kv_segment_ids=seg))
    g_kern = jax.jit(jax.grad(kern, argnums=(0, 1, 2)))(q, k, v)
    g_ref = jax.jit(jax.grad(ref, argnums=(0, 1, 2)))(q, k, v)
    for name, a, b in zip("qkv", g_kern, g_ref):
        scale = max(1.0, float(jnp.abs(b).max()))
        err = float(jnp.abs(a - b).max())
        assert err <= 1e-5 * scale * 4, f"d{name}: max abs error {err:.3g} (scale {scale:.3g})"
    # keys past a row's length get no gradient
    b = int(np.argmin(np.asarray(lens)))
    L = int(lens[b])
    assert np.all(np.asarray(g_kern[1])[b, L:] == 0) and np.all(np.asarray(g_kern[2])[b, L:] == 0)


def test_segment_ids_matter_and_match_gathered_segments():
    """Explicit segment ids in one row == the segments gathered into the batch axis with per-row
    lengths (how the vision tower calls attention)."""
    rng = np.random.default_rng(50)
    lens_seg = [7, 12, 5]
    T, H, E = sum(lens_seg), 2, 16
    q, k, v = (_normal(rng, (1, T, H, E), jnp.float32) for _ in range(3))
    seg = jnp.asarray(np.repeat(np.arange(3), lens_seg)[None], jnp.int32)
    packed = prefill_attention(q, k, v, jnp.asarray([T]), causal=False, q_segment_ids=seg, kv_segment_ids=seg,
                               block_q=16, block_kv=16, backend=GPU_INTERP)
    L = max(lens_seg)
    starts = np.cumsum([0] + lens_seg[:-1])
    idx = np.asarray([[s + min(i, n - 1) for i in range(L)] for s, n in zip(starts, lens_seg)])
    gather = lambda x: x[0][idx]  # noqa: E731
    per = prefill_attention(gather(q), gather(k), gather(v), jnp.asarray(lens_seg), causal=False, block_q=16,
                            block_kv=16, backend=GPU_INTERP)
    back = np.concatenate([np.asarray(per)[i, :n] for i, n in enumerate(lens_seg)])
    np.testing.assert_allclose(np.asarray(packed)[0], back, atol=1e-5)
    whole = prefill_attention(q, k, v, jnp.asarray([T]), causal=False, block_q=16, block_kv=16, backend=GPU_INTERP)
    assert np.abs(np.asarray(whole) - np.asarray(packed)).max() > 1e-2


def test_tpu_style_grid_in_interpret_mode():
    """The TPU build (scalar-prefetched lengths, clamped chunk index maps, lane-wide statistics,
    (8, 128) blocks) runs the same kernel bodies; checked in the interpreter with head_dim 128."""
    args = cache_block_case(60, jnp.float32, E=128, S=300)
    ref = vata_ref(*args)
    _check(vata_attention(*args, block_rows=8, block_kv=128, backend=TPU_INTERP), ref, jnp.float32)
    _check(tree_verify_attention(*args, block_rows=8, block_kv=128, chunk=128, backend=TPU_INTERP), ref, jnp.float32)
    q, k, v, lens, _ = prefill_case(61, jnp.float32, causal=True, E=128, T=40)
    out = prefill_attention(q, k, v, lens, causal=True, block_q=8, block_kv=128, backend=TPU_INTERP)
    _check(out, prefill_ref(q, k, v, lens, causal=True), jnp.float32)


def test_block_size_rules_are_asserted():
    C.check_blocks("gpu", rows=16, kv=32, head_dim=64)
    C.check_blocks("tpu", rows=8, kv=128, head_dim=128)
    for style, rows, kv, e in [("gpu", 16, 48, 64), ("gpu", 8, 32, 64), ("gpu", 16, 32, 96), ("tpu", 8, 64, 128),
                               ("tpu", 8, 128, 64), ("tpu", 4, 128, 128)]:
        with pytest.raises(AssertionError):
            C.check_blocks(style, rows=rows, kv=kv, head_dim=e)
    with pytest.raises(AssertionError):  # a kernel call with an illegal block size fails before lowering
        vata_attention(*cache_block_case(0, jnp.float32, E=128), block_kv=64, backend=TPU_INTERP)


def test_dispatch_routes_and_reasons():
    s = jax.ShapeDtypeStruct
    f32 = jnp.float32
    cfg = dispatch.DispatchConfig(split_min_len=1024, backend=GPU_INTERP)
    lens = jnp.zeros((2,), jnp.int32)
    pre = MaskSpec(kv_len_B=lens, causal=True)
    blk = MaskSpec(kv_len_B=lens, block_mask_BTN=jnp.ones((2, 4, 4), bool))
    q, kv = s((2, 64, 8, 64), f32), s((2, 64, 2, 64), f32)
    assert dispatch.route(q, kv, kv, pre, config=cfg) == ("prefill", "")
    q4 = s((2, 4, 8, 64), f32)
    nb = s((2, 4, 2, 64), f32)
    assert dispatch.route(q4, s((2, 512, 2, 64), f32), s((2, 512, 2, 64), f32), blk, block_k=nb, block_v=nb,
                          config=cfg)[0] == "vata"
    assert dispatch.route(q4, s((2, 4096, 2, 64), f32), s((2, 4096, 2, 64), f32), blk, block_k=nb, block_v=nb,
                          config=cfg)[0] == "tree_verify"
    # head_dim 80 (Qwen2.5-VL vision): prefill zero-pads it; the cache kernels would copy the cache
    e80 = s((2, 64, 2, 80), f32)
    assert dispatch.route(s((2, 64, 8, 80), f32), e80, e80, pre, config=cfg)[0] == "prefill"
    name, why = dispatch.route(s((2, 4, 8, 80), f32), e80, e80, blk, block_k=s((2, 4, 2, 80), f32),
                               block_v=s((2, 4, 2, 80), f32), config=cfg)
    assert name == "xla" and "head_dim 80" in why
    tpu = dispatch.DispatchConfig(backend=C.Backend("tpu", False))
    name, why = dispatch.route(q4, kv, kv, blk, block_k=nb, block_v=nb, config=tpu)
    assert name == "xla" and "multiple of 128" in why
    name, why = dispatch.route(s((2, 8, 8, 128), f32), s((2, 64, 2, 128), f32), s((2, 64, 2, 128), f32), pre,
                               config=tpu)
    assert name == "xla" and "T 8 != S 64" in why
    big = s((1, 1 << 16, 1, 128), jnp.bfloat16)
    name, why = dispatch.route(s((1, 1 << 16, 1, 128), jnp.bfloat16), big, big, pre, config=tpu)
    assert name == "xla" and "VMEM" in why


def test_library_attention_impl_pallas_matches_xla():
    """`attention(..., impl=AttentionImpl("pallas"))` (what the models call) == the XLA path for the three
    call kinds, each running its kernel (read from the lowered program); an unsupported head_dim falls
    back to XLA transparently; impl XLA never goes through the dispatch."""
    rng = np.random.default_rng(70)
    B, T, H, K, E, S = 2, 6, 4, 2, 16, 40
    q, k, v = _normal(rng, (B, T, H, E), jnp.float32), _normal(rng, (B, S, K, E), jnp.float32), \
        _normal(rng, (B, S, K, E), jnp.float32)
    bk, bv = _normal(rng, (B, T, K, E), jnp.float32), _normal(rng, (B, T, K, E), jnp.float32)
    blk = MaskSpec(kv_len_B=jnp.asarray([17, 40]), block_mask_BTN=jnp.tril(jnp.ones((B, T, T), bool)))

    def routes(impl, *args, **kw):  # jitted: one compile per call kind (the eager path compiles op by op)
        f = jax.jit(lambda impl, *a: attention(*a, impl=impl, **kw), static_argnums=0)
        _check(f(impl, *args), f(XLA, *args), jnp.float32)
        assert dispatch.routes_in(f.lower(XLA, *args)) == {}
        return dispatch.routes_in(f.lower(impl, *args))

    assert routes(AttentionImpl.pallas(split_min_len=1 << 20), q, k, v, blk, block_k=bk, block_v=bv) == {"vata": 1}
    assert routes(AttentionImpl.pallas(split_min_len=16), q, k, v, blk, block_k=bk, block_v=bv) == {"tree_verify": 1}
    qs, ks, vs = _normal(rng, (3, S, H, E), jnp.float32), _normal(rng, (3, S, K, E), jnp.float32), \
        _normal(rng, (3, S, K, E), jnp.float32)
    for causal in (True, False):
        assert routes(AttentionImpl("pallas"), qs, ks, vs, MaskSpec(kv_len_B=jnp.asarray([S, 9, 1]), causal=causal)) \
            == {"prefill": 1}
    odd = _normal(rng, (1, 8, 2, 12), jnp.float32)  # head_dim 12: not a Triton block size
    m = MaskSpec(kv_len_B=jnp.asarray([8]), block_mask_BTN=jnp.eye(8, dtype=bool)[None])
    assert routes(AttentionImpl("pallas"), odd, odd, odd, m, block_k=odd, block_v=odd) == {"xla": 1}
    # the fallback is the xla impl's own program: bit-equal when both are compiled (an eager op-by-op run of the
    # xla impl rounds its merge differently from a compiled one, ~5e-7 with the CPU kernel)
    run = jax.jit(lambda impl, x: attention(x, x, x, m, block_k=x, block_v=x, impl=impl), static_argnums=0)
    np.testing.assert_array_equal(np.asarray(run(AttentionImpl("pallas"), odd)), np.asarray(run(XLA, odd)))


def test_attention_impl_value():
    """The implementation is a hashable value (a static jit argument) built from "xla" / "pallas" at the
    boundary; anything else is refused with a message naming it."""
    assert AttentionImpl.of("pallas") == AttentionImpl("pallas") and AttentionImpl.of(XLA) is XLA
    small = AttentionImpl.pallas(split_min_len=160)
    assert small.blocks.split_min_len == 160 and hash(small) == hash(AttentionImpl.pallas(split_min_len=160))
    assert small.blocks.block_kv == dispatch.default_config().block_kv
    with pytest.raises(ValueError, match="'flash'"):
        AttentionImpl.of("flash")
    with pytest.raises(ValueError, match="block sizes"):
        AttentionImpl("xla", dispatch.DispatchConfig())
    with pytest.raises(ValueError, match="DispatchConfig.block_kv 0"):
        dispatch.DispatchConfig(block_kv=0)
    x = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(TypeError, match="impl 'pallas' must be an AttentionImpl"):
        attention(x, x, x, MaskSpec(kv_len_B=jnp.asarray([4]), causal=True), impl="pallas")


@pytest.fixture
def tpu_info_on_cpu(monkeypatch):
    """Mosaic's lowering asks for the TPU generation; answer v5e for the CPU device (lowering only)."""
    try:
        from jax._src.pallas.mosaic import tpu_info  # noqa: PLC0415
    except ImportError:  # pragma: no cover
        pytest.skip("private Mosaic tpu_info module not available in this jax")
    monkeypatch.setitem(tpu_info.registry, jax.devices()[0].device_kind,
                        lambda: tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V5E, 1))


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_kernels_lower_for_tpu_and_gpu(platform, tpu_info_on_cpu):
    """Cross-lowering on CPU (jax.export for another platform): the kernel bodies pass the Mosaic TPU
    and Triton lowerings (grid, block shapes, ops) in bf16 with head_dim 128 and head_dim 80 for the
    padded prefill. Lowering only: nothing is compiled for or run on a GPU/TPU here."""
    style = "tpu" if platform == "tpu" else "gpu"
    be = C.Backend(style, False)
    rows = 8 if style == "tpu" else 16
    args = cache_block_case(80, jnp.bfloat16, E=128, S=1024)
    q, k, v, lens, _ = prefill_case(81, jnp.bfloat16, causal=True, E=80, T=256)
    seg = jnp.zeros(q.shape[:2], jnp.int32)

    def prefill_grad(q, k, v, lens, seg):
        f = lambda q, k, v: prefill_attention(q, k, v, lens, causal=True, q_segment_ids=seg,  # noqa: E731
                                              kv_segment_ids=seg, block_q=64, block_kv=128, backend=be)
        return jax.value_and_grad(lambda *a: f(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2))(q, k, v)

    fns = [(lambda *a: vata_attention(*a, block_rows=rows, block_kv=128, backend=be), args),
           (lambda *a: tree_verify_attention(*a, block_rows=rows, block_kv=128, chunk=256, backend=be), args),
           (prefill_grad, (q, k, v, lens, seg))]
    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")] if platform == "cuda" else []
    marker = "tpu_custom_call" if platform == "tpu" else "xla.gpu.triton"
    for (f, a), n_kernels in zip(fns, (1, 1, 3)):
        text = jax.export.export(jax.jit(f), platforms=[platform], disabled_checks=checks)(*a).mlir_module()
        assert text.count(marker) == n_kernels


def test_interpret_is_chosen_on_cpu():
    assert C.Backend.detect("cpu") == C.Backend("gpu", True)
    assert C.Backend.detect("tpu") == C.Backend("tpu", False)
    assert C.Backend.detect("gpu") == C.Backend("gpu", False)
    if jax.default_backend() == "cpu":
        assert C.Backend.detect().interpret

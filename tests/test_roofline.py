"""bench/roofline.py times the engine's own decode functions (the AR loop's and the speculative round's
`target.verify_fn`, over 1 node and over the tree), and its records carry a positive floor built from
the bytes a step must read. No timing assertions: only what the records say and how they were made."""

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import roofline  # noqa: E402
from sparrow_jax.models import target as tg  # noqa: E402


def test_records_are_sane_and_time_the_engine_functions(small_config_file, tmp_path, monkeypatch):
    blocks = []
    real = tg.verify_fn

    def spy(model, cache, tokens_BN, *a, **k):  # traced once per compiled program
        blocks.append(tokens_BN.shape[1])
        return real(model, cache, tokens_BN, *a, **k)

    monkeypatch.setattr(tg, "verify_fn", spy)
    out = tmp_path / "r.jsonl"
    records = roofline.main(["--configs", f"{small_config_file}@1", "--lengths", "64", "192", "--trees", "8-2-2",
                             "--probe-capacity", "--cache-blocks", "64", "--gemm-columns", "0", "16", "--repeats", "1", "--ar-steps", "2", "--verify-rounds", "1",
                             "--stream-mib", "8", "--matmul-n", "64", "--jsonl", str(out), "--plot", ""])
    assert set(blocks) == {1, 8}  # AR's one-node step and the tree's verify both went through verify_fn
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {k: v for k, v in r.items() if k != "vs_ar"} for r in records]
    cells = [(r["step"], r["committed"], r["probe"], r["cache_block"], r["gemm_columns"]) for r in records]
    assert len(cells) == len(set(cells)) and set(cells) == {
        (s, p, probe, 64, gc) for gc in (0, 16) for s in ("ar", "verify")
        for p, probe in ((64, False), (192, False), (64, True))}  # each setting (transposed chunks / GEMMs) its own cells
    assert all("vs_ar" in r for r in records if not r["probe"])  # each against the AR step of its setting
    E, K, L = 32, 1, 1  # head_dim 64 / 2 heads, kv heads, LM layers (@1)
    for r in records:
        assert r["ar_fn"] == "sparrow_jax.decoding.autoregressive.ar_generate"
        assert r["verify_fn"] == "sparrow_jax.decoding.engine.verify_phase"
        assert r["lm_layers"] == L and r["nodes"] == (1 if r["step"] == "ar" else 8)
        assert r["kv_bytes"] == 2 * L * r["committed"] * K * E * 4
        # one layer (q, k, v, o, gate, up, down + biases + 2 norms), the final norm, an untied 128-wide head
        layer = 2 * 64 * 64 + 2 * 64 * 32 + 64 + 2 * 32 + 3 * 64 * 128 + 2 * 64
        assert r["weight_bytes"] == 4 * (layer + 64 + 64 * 1024)
        assert r["floor_ms"] > 0 and r["floor_ms"] == max(r["memory_floor_ms"], r["flop_floor_ms"])
        assert math.isfinite(r["step_ms"]) and math.isfinite(r["ratio"])
        assert r["capacity"] >= r["committed"] + r["max_new_tokens"] + r["cache_slack"]
        assert r["stream_bytes_per_s"] > 0 and r["matmul_flops_per_s"] > 0
        assert r["command"].startswith("python") and r["machine"] and r["jax"]
    probe = [r for r in records if r["probe"]]
    assert all(r["capacity"] == max(x["capacity"] for x in records) for r in probe)


def test_bad_config_spec_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no such config file"):
        roofline.main(["--configs", str(tmp_path / "missing.json")])
    with pytest.raises(SystemExit, match="LAYERS after '@'"):
        roofline.main(["--configs", str(ROOT / "configs" / "tiny.json") + "@x"])

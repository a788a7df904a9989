"""Sharded inference (issue 12 §2). On 8 host devices (a subprocess: the device count is fixed at process
start, tests/_sharded_run.py): sharded AR and sharded Sparrow give exactly the single-device tokens for
both families, and the target's q_proj / MLP kernels and KV cache are split where sharding.RULES says.
In-process: the one mesh check (DecodeConfig.mesh, decode.py --mesh) refuses bad meshes in one line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

import _tiny

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import decode  # noqa: E402
from sparrow_jax import api  # noqa: E402
from sparrow_jax.decoding import placement as PL  # noqa: E402

from test_decode_cli import error_of  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("mesh")
    return (d, *_tiny.write_cli_files(d))


@pytest.mark.slow
def test_sharded_decoding_on_8_devices_is_token_identical_and_split_by_the_rules(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "_sharded_run.py"), str(tmp_path)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    res = json.loads(next(line for line in p.stdout.splitlines() if line.startswith("RESULT "))[7:])
    data, tensor = ["data", "fsdp"], "tensor"
    for fam, r in res.items():
        toks = r["tokens"]
        ref = toks["ar@one device"]
        assert all(len(row) == 8 for row in ref), (fam, ref)
        for run, got in toks.items():  # sharded AR and Sparrow == one device (and Sparrow == AR: lossless)
            assert got == ref, (fam, run, got, ref)
        # heads and MLP on tensor (fsdp is 1: the embed axis stays whole)
        assert r["q_proj"][1] == tensor and r["o_proj"][0] == tensor, (fam, r["q_proj"], r["o_proj"])
        assert r["mlp_up"][1] == tensor and r["mlp_down"][0] == tensor, fam
        # KV cache [B, S, K, E]: rows on data, KV heads on tensor, in every layer; a shard holds 1 row, 1 KV head
        for spec in r["target_k"] + r["target_v"]:
            assert spec == [data, None, tensor, None], (fam, spec)
        B, S, K, E = r["target_k_shape"]
        assert r["target_k_shard_shape"] == [B // 2, S, K // 4, E], fam
        assert r["draft_k"] == [data] and r["draft_param"] == [], fam  # the draft replicated, its cache by row
        assert r["rules_replicate"] == 0, fam  # nothing the rules split is left whole on this mesh


def test_mesh_text_is_parsed_once_for_api_and_cli():
    assert PL.parse_mesh("data=2,tensor=4") == PL.MeshSpec(2, 4)
    assert PL.parse_mesh("tensor=8") == PL.MeshSpec(1, 8)
    for bad in ("tensor8", "model=8", "data=1,data=2", "tensor=0", ""):
        with pytest.raises(api.DecodeConfigError, match="^mesh "):
            api.DecodeConfig(mesh=bad)


def test_mesh_that_does_not_fit_is_a_one_line_error(files, capsys):
    d, cfg, video = files
    n = len(jax.devices())
    code, msg = error_of(["--config", str(cfg), "--video", str(video), "--max-new-tokens", "2",
                          "--mesh", f"data=1,tensor={n + 1}"], capsys)
    assert code == 2 and f"--mesh data=1,tensor={n + 1}: needs data*tensor = {n + 1} devices, {n} present" in msg
    code, msg = error_of(["--config", str(cfg), "--video", str(video), "--max-new-tokens", "2", "--mesh", "tensor=x"],
                         capsys)
    assert code == 2 and "--mesh 'tensor=x': expected data=D,tensor=T" in msg


def test_tensor_that_does_not_divide_the_heads_names_what_the_rules_would_replicate():
    cfg = _tiny.our_config()  # 4 attention heads, 2 KV heads
    with pytest.raises(PL.MeshError) as e:
        PL.check_mesh("data=1,tensor=8", cfg, name="--mesh")
    msg = str(e.value)
    assert msg.startswith("--mesh data=1,tensor=8: tensor=8 does not divide the target's 4 attention heads and 2 KV "
                          "heads") and "\n" not in msg
    assert "the KV cache would stay whole (2 KV heads)" in msg and "use a tensor size that divides 2" in msg
    assert "replicate 2 parameter(s): lm_head.kernel (vocab 300); model.embed_tokens.embedding (vocab 300)" in msg
    with pytest.raises(PL.MeshError, match="a batch of 3 row.s. does not split over data=2"):
        PL.check_mesh("data=2,tensor=2", cfg, batch=3)
    assert PL.check_mesh("data=1,tensor=2", cfg) == PL.MeshSpec(1, 2)

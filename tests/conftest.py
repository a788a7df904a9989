"""Session-wide tiny models (built once; compiled functions are reused across tests)."""

import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import _tiny  # noqa: E402


@pytest.fixture(scope="session")
def small_target():
    """Random target with the 24-token vocabulary (vision specials 20-23)."""
    return _tiny.random_model(_tiny.our_config(_tiny.SMALL_VOCAB_CONFIG), seed=7, scale=2.0)


@pytest.fixture(scope="session")
def random_draft(small_target):
    from sparrow_jax.models.draft import DraftConfig, SparrowDraft

    return SparrowDraft(DraftConfig.for_target(small_target.cfg), rngs=nnx.Rngs(11))


# Draft training for tests: the Trainer itself (one training code path), offline features of synthetic
# samples (video + random text, and a few text-only ones; responses = the target's own greedy answers),
# 150 cheap steps.
DRAFT_TRAIN = dict(max_text=32, max_visual=16, steps=150, global_batch=8, lr=3e-3, warmup=2, log_every=50,
                   save_every=10**6, tensorboard=False)


@pytest.fixture(scope="session")
def train_draft(small_target, tmp_path_factory):
    """train_draft(**TrainConfig overrides) -> a SparrowDraft trained by `Trainer` for `small_target`
    (defaults: Sparrow = view none + IVSB + MTP 2). Cached per settings; features are extracted once
    per kind of visual state and shared."""
    from sparrow_jax.models.target import default_m_star
    from sparrow_jax.synthetic.samples import synthetic_samples
    from sparrow_jax.training.data import Sample
    from sparrow_jax.training.features import FeatureSpec, extract_features
    from sparrow_jax.training.trainer import TrainConfig, Trainer

    root = tmp_path_factory.mktemp("drafts")
    rng = np.random.default_rng(2)
    samples = synthetic_samples(small_target.cfg, 32, seed=1, text_vocab=_tiny.SMALL_TEXT_VOCAB) + [  # + text-only
        Sample(_tiny.prompt([_tiny.random_text(rng, int(rng.integers(4, 12)), _tiny.SMALL_TEXT_VOCAB)]), ())
        for _ in range(8)]
    m_star = default_m_star(small_target.cfg.num_layers)
    feature_dirs, drafts = {}, {}

    def features(spec: FeatureSpec):
        if spec.visual is None:  # no visual slots: any feature set serves
            spec = FeatureSpec(spec.m_star)
        if spec not in feature_dirs:
            d = root / f"features{len(feature_dirs)}"
            extract_features(small_target, samples, d, spec=spec, regenerate=16, progress=False)
            feature_dirs[spec] = d
        return feature_dirs[spec]

    def train(**overrides):
        key = tuple(sorted(overrides.items()))
        if key not in drafts:
            cfg = TrainConfig(**{**DRAFT_TRAIN, **overrides, "out_dir": str(root / f"run{len(drafts)}")})
            cfg = dataclasses.replace(cfg, features=str(features(cfg.feature_spec(m_star))))
            trainer = Trainer(cfg, target=small_target, log=lambda *a: None)
            trainer.run(progress=False)
            drafts[key] = trainer.draft()
        return drafts[key]

    return train


@pytest.fixture(scope="session")
def trained_draft(train_draft):
    """A Sparrow draft (view none, IVSB, MTP 2) trained by the Trainer: accepted often (tests
    multi-token acceptance)."""
    return train_draft()


@pytest.fixture(scope="module", autouse=True)
def _drop_compiled_programs_after_each_module():
    """The suite compiles hundreds of programs in one process; dropping jax's caches after each module keeps
    the process from accumulating them (a long full run once crashed inside the XLA compiler)."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


@pytest.fixture
def small_config_file(tmp_path):
    """configs/tiny.json shrunk to a 64-wide, 2-layer LM (1 KV head), written as a config file: the bench
    scripts' fast modes (roofline, round_profile) read a config path."""
    d = json.loads((Path(__file__).resolve().parent.parent / "configs" / "tiny.json").read_text())
    d["text_config"].update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=1)
    d["text_config"]["rope_parameters"]["mrope_section"] = [4, 6, 6]
    p = tmp_path / "small_config.json"
    p.write_text(json.dumps(d))
    return p


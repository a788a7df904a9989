"""Session-wide tiny models (built once; compiled functions are reused across tests)."""

import os
import sys

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


@pytest.fixture(scope="session")
def trained_draft(small_target):
    """A draft distilled for a few steps: accepted often (tests multi-token acceptance)."""
    import _distill
    from sparrow_jax.models.draft import DraftConfig, SparrowDraft

    draft = SparrowDraft(DraftConfig.for_target(small_target.cfg), rngs=nnx.Rngs(12))
    rng = np.random.default_rng(100)
    cfg = small_target.cfg
    prompts = [_tiny.prompt([_tiny.random_text(rng, int(rng.integers(3, 8)), _tiny.SMALL_TEXT_VOCAB),
                             _tiny.visual(rng, (int(rng.integers(1, 3)), 4, 4)),
                             _tiny.random_text(rng, 3, _tiny.SMALL_TEXT_VOCAB)], cfg) for _ in range(8)]
    prompts += [_tiny.prompt([_tiny.random_text(rng, 6, _tiny.SMALL_TEXT_VOCAB)], cfg) for _ in range(4)]
    _distill.distill(small_target, draft, prompts, steps=60)
    return draft

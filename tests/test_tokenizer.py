"""The shipped tokenizer: transformers' AutoTokenizer and our codec load it and agree, text round-trips,
special ids match configs/tiny.json, the chat template renders our prompt layout, regeneration is
deterministic, and world captions are typically >= 60 tokens."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from sparrow_jax.io.text import QWEN_ASSISTANT_PREFIX, QWEN_USER_PREFIX, load_codec
from sparrow_jax.io.vision_inputs import VisionTokenIds
from sparrow_jax.synthetic import tokenizer as T
from sparrow_jax.synthetic import world as W

ROOT = Path(__file__).resolve().parent.parent
CONFIG = json.loads((ROOT / "configs" / "tiny.json").read_text())
VOCAB = CONFIG["text_config"]["vocab_size"]
TEXTS = [W.caption(W.make_scene(s, d), v) for s in range(5) for d in (8, 300) for v in (0, 1)] + [
    "Hello, World! naïve café 12345 😀\ttab\nnew line  two  spaces", "<|im_start|>user\nWhat?<|im_end|>\n"]


@pytest.fixture(scope="module")
def auto_tok():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(T.SHIPPED_DIR)


@pytest.fixture(scope="module")
def codec():
    return load_codec(T.SHIPPED_DIR, VOCAB)


def test_special_ids_match_the_config(auto_tok, codec):
    assert T.check_config(CONFIG) == VOCAB == len(auto_tok)
    ids = VisionTokenIds.from_config(CONFIG)
    want = {"<|im_end|>": CONFIG["text_config"]["eos_token_id"][0], "<|vision_start|>": ids.vision_start,
            "<|vision_end|>": ids.vision_end, "<|image_pad|>": ids.image_pad, "<|video_pad|>": ids.video_pad}
    for tok, i in {**T.special_ids(VOCAB), **want}.items():
        assert auto_tok.convert_tokens_to_ids(tok) == i and codec.encode(tok) == [i]
    assert auto_tok.eos_token_id == want["<|im_end|>"]
    bad = {**CONFIG, "video_token_id": ids.video_pad - 1}
    with pytest.raises(ValueError, match="video_token_id"):
        T.check_config(bad)


def test_text_round_trips_and_both_loaders_agree(auto_tok, codec):
    for text in TEXTS:
        ids = codec.encode(text)
        assert auto_tok(text, add_special_tokens=False).input_ids == ids
        assert auto_tok.decode(ids) == text
        assert max(ids) < VOCAB
    plain = TEXTS[0]
    assert codec.decode(codec.encode(plain)) == plain


def test_chat_template_renders_the_prompt_layout(auto_tok, codec):
    q = "Describe the video in detail."
    msgs = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": q}]}]
    text = auto_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == QWEN_USER_PREFIX + "<|vision_start|><|video_pad|><|vision_end|>" + q + QWEN_ASSISTANT_PREFIX
    # Our sample prompt == the template's tokens with the one <|video_pad|> expanded to the visual's count.
    sc = W.make_scene(W.split_seeds("test", 1)[0], 8)
    qa = W.QA(q, W.caption(sc), "caption", None)
    sample = W.scene_sample(sc, qa, codec, VisionTokenIds.from_config(CONFIG), roundtrip=False)
    n = sample.prompt.visuals[0].num_tokens
    expanded = auto_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True).replace(
        "<|video_pad|>", "<|video_pad|>" * n)
    assert auto_tok(expanded, add_special_tokens=False).input_ids == sample.prompt.input_ids.tolist()
    assert sample.response[-1] == auto_tok.eos_token_id
    assert auto_tok.decode(list(sample.response), skip_special_tokens=True) == qa.answer


def test_regeneration_is_deterministic():
    a, b = T.train_tokenizer(VOCAB, seed=1, num_scenes=3), T.train_tokenizer(VOCAB, seed=1, num_scenes=3)
    assert a.to_str() == b.to_str()
    assert a.get_vocab_size() == VOCAB and a.token_to_id("<|video_pad|>") == T.special_ids(VOCAB)["<|video_pad|>"]


@pytest.mark.slow
def test_shipped_tokenizer_is_the_default_regeneration(tmp_path):
    T.main(["--out", str(tmp_path)])
    for name in ("tokenizer.json", "tokenizer_config.json", "video_preprocessor_config.json"):
        assert (tmp_path / name).read_bytes() == (T.SHIPPED_DIR / name).read_bytes(), name


def test_vocab_and_caption_lengths(codec):
    n_bpe = codec.tok.get_vocab_size(with_added_tokens=False)
    assert n_bpe <= VOCAB - 8 <= 4096
    lengths = [len(codec.encode(W.caption(W.make_scene(s, 8), s))) for s in W.split_seeds("validation", 200)]
    assert np.median(lengths) >= 60 and np.percentile(lengths, 10) >= 50
    # Every pre-token (word, digit, punctuation run) of the world's text is one BPE token.
    pre = codec.tok.pre_tokenizer
    for text in TEXTS[:-2]:
        assert len(codec.encode(text)) == len(pre.pre_tokenize_str(text)), text


def test_preprocessor_config_gives_the_world_preprocessing():
    from sparrow_jax.io.vision_inputs import VisionPreprocessConfig

    cfg = VisionPreprocessConfig.from_hf_preprocessor_json(T.SHIPPED_DIR / "video_preprocessor_config.json")
    assert cfg == W.WorldConfig().vision_config()

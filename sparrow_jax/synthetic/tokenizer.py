"""The tiny world's tokenizer: byte-level BPE trained with `tokenizers` on the world's captions and QA,
Qwen2-style pre-tokenisation (single digits, NFC), Qwen special tokens and Qwen2-VL's chat template,
saved so that transformers' `AutoTokenizer` and our `io.text` codec both load it.

Id layout (one place: `special_ids`): BPE tokens from 0; the named special tokens at
vocab_size - 8 ... vocab_size - 2 in Qwen's order; reserved special tokens fill the rest, because
`tokenizers` numbers added tokens contiguously after the model vocabulary. The world's language has
~700 BPE tokens, so the shipped vocabulary is 1024 (a 4096-row LM head would be 84% dead rows, and the
head dominates a one-layer draft's step on CPU).

Regenerate (deterministic for a seed):
    python -m sparrow_jax.synthetic.tokenizer --config configs/tiny.json --out shipped/tiny-qwen2.5-vl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from sparrow_jax.io.vision_inputs import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from sparrow_jax.synthetic import world

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_DIR = world.SHIPPED_DIR  # ROOT / "shipped" / "tiny-qwen2.5-vl"

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")
# Qwen2's pre-tokenizer split: contractions, letter runs with one leading non-letter, single digits,
# punctuation runs, newlines, spaces.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2-VL / Qwen2.5-VL's chat template (chat_template.json of the released checkpoints).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
# Text the world does not generate but every prompt carries, plus a few generic requests.
EXTRA_TEXT = ("system\nYou are a helpful assistant.", "user\n", "assistant\n", "What is moving in this video?",
              "Describe the video.", "What colour is it?", "How many objects are there?")


def special_ids(vocab_size: int) -> dict[str, int]:
    """Named special token -> id: the 8 top ids minus the last, in Qwen's order."""
    return {tok: vocab_size - 8 + i for i, tok in enumerate(SPECIAL_TOKENS)}


def check_config(config: dict) -> int:
    """The target config's vocab size, after checking its token ids follow `special_ids`."""
    text = config.get("text_config", config)
    vocab = int(text["vocab_size"])
    ids = special_ids(vocab)
    eos = text.get("eos_token_id", config.get("eos_token_id"))
    want = {"eos_token_id": ids["<|im_end|>"], "vision_start_token_id": ids["<|vision_start|>"],
            "vision_end_token_id": ids["<|vision_end|>"], "image_token_id": ids["<|image_pad|>"],
            "video_token_id": ids["<|video_pad|>"]}
    have = {k: (eos[0] if isinstance(eos, list) else eos) if k == "eos_token_id" else config.get(k, text.get(k))
            for k in want}
    bad = {k: (have[k], v) for k, v in want.items() if have[k] != v}
    if bad:
        raise ValueError(f"config token ids do not follow the tokenizer layout for vocab {vocab} "
                         f"(key: (config, expected)): {bad}")
    return vocab


def training_text(seed: int = 0, num_scenes: int = 100):
    """The corpus: every caption/question/answer of `num_scenes` train scenes at each named length."""
    seeds = world.split_seeds("train", num_scenes, offset=seed * num_scenes)
    yield from EXTRA_TEXT
    yield from world.corpus(seeds, sorted(set(world.LENGTHS.values()) | {4}), variants=2)


def train_tokenizer(vocab_size: int = 1024, seed: int = 0, num_scenes: int = 100) -> Tokenizer:
    """Byte-level BPE on the world's text with the special/reserved tokens at their fixed ids."""
    n_bpe = vocab_size - 8
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=n_bpe, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_text(seed, num_scenes), trainer)
    n = tok.get_vocab_size()
    if n > n_bpe:
        raise RuntimeError(f"BPE grew to {n} tokens, more than the {n_bpe} below the special ids")
    reserved = [f"<|reserved_{i}|>" for i in range(n_bpe - n)]
    tok.add_special_tokens(reserved + list(SPECIAL_TOKENS) + [f"<|reserved_{n_bpe - n}|>"])
    ids = special_ids(vocab_size)
    assert all(tok.token_to_id(t) == i for t, i in ids.items()) and tok.get_vocab_size() == vocab_size
    return tok


def save_tokenizer(tok: Tokenizer, out_dir, *, model_max_length: int = 65536) -> Path:
    """tokenizer.json + tokenizer_config.json (Qwen2Tokenizer, chat template) into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    cfg = {"tokenizer_class": "Qwen2Tokenizer", "model_max_length": model_max_length,
           "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None, "unk_token": None,
           "errors": "replace", "add_prefix_space": False, "clean_up_tokenization_spaces": False,
           "split_special_tokens": False, "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def save_preprocessor_config(out_dir, cfg: world.WorldConfig = world.WorldConfig()) -> Path:
    """(video_)preprocessor_config.json for the world's resolution and frame rate, readable by
    `VisionPreprocessConfig.from_hf_preprocessor_json` and by transformers' Qwen2-VL processors."""
    out = Path(out_dir)
    pixels = cfg.height * cfg.width
    common = {"size": {"shortest_edge": pixels, "longest_edge": pixels}, "min_pixels": pixels, "max_pixels": pixels,
              "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "do_resize": True, "resample": 3,
              "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
              "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD), "do_convert_rgb": True}
    (out / "preprocessor_config.json").write_text(json.dumps(
        {**common, "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"},
        indent=2) + "\n")
    (out / "video_preprocessor_config.json").write_text(json.dumps(
        {**common, "video_processor_type": "Qwen2VLVideoProcessor", "processor_class": "Qwen2_5_VLProcessor",
         "do_sample_frames": True, "fps": cfg.fps, "min_frames": 4, "max_frames": cfg.max_frames}, indent=2) + "\n")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "tiny.json"), help="target config (ids checked)")
    ap.add_argument("--out", default=str(SHIPPED_DIR))
    ap.add_argument("--seed", type=int, default=0, help="picks the corpus's train scenes")
    ap.add_argument("--num-scenes", type=int, default=100)
    args = ap.parse_args(argv)
    vocab = check_config(json.loads(Path(args.config).read_text()))
    tok = train_tokenizer(vocab, args.seed, args.num_scenes)
    out = save_tokenizer(tok, args.out, model_max_length=65536)
    save_preprocessor_config(out)
    n_bpe = tok.get_vocab_size(with_added_tokens=False)
    print(f"[tokenizer] {n_bpe} BPE tokens + {vocab - n_bpe} special/reserved = {vocab}; wrote {out}")


if __name__ == "__main__":
    main()

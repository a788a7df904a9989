"""Does the target read the video? The world's questions about held-out scenes, asked with the real
video and with controls (`world.ablate`: blank, temporally shuffled), answered greedily by our AR path
and scored against the scene graph (`world.score_caption`, `world.score_answer`).

Each video is prefilled once (chat prefix + video) and every question about it continues that cache
(`extend`: the question tokens are appended as a causal chain at the positions a full prompt gives
them), so a long video costs one prefill however many questions are asked. `bench/target_reads_video.py`
is the command line.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparrow_jax.decoding.autoregressive import ar_generate, cache_capacity
from sparrow_jax.decoding.sampling import SamplingParams
from sparrow_jax.io.text import QWEN_ASSISTANT_PREFIX, QWEN_USER_PREFIX
from sparrow_jax.io.vision_inputs import VisionTokenIds, VisualInput, build_multimodal_prompt
from sparrow_jax.models import target as tg
from sparrow_jax.models.attention import XLA, AttentionImpl
from sparrow_jax.models.kv_cache import KVCache, commit as commit_cache
from sparrow_jax.models.registry import prepare_batch_for
from sparrow_jax.runtime import graph_jit
from sparrow_jax.synthetic import world as W

CONDITIONS = ("real", "blank", "shuffled")
# One question of each kind per scene (when the scene has one): attributes, counts, time, events and
# their order ("object": which appears first / last).
QA_KINDS = ("colour", "shape", "motion", "count", "time", "event", "object")
QA_MAX_NEW = 32  # the world's longest short answer (an event sentence) is ~20 tokens
QUESTION_BUCKET = 32  # question tokens are padded to a multiple of this (one compiled extend per bucket)


def scene_items(scene: W.Scene, kinds=QA_KINDS) -> list[W.QA]:
    """The caption request, then one question per kind in `kinds` that the scene supports (a seeded
    choice among that kind's questions)."""
    qas = W.scene_qa(scene, variant=0)
    rng = np.random.default_rng([scene.seed, scene.duration, 5])
    out = [qas[0]]
    for kind in kinds:
        pool = [q for q in qas[1:] if q.kind == kind]
        if pool:
            out.append(pool[rng.integers(len(pool))])
    return out


def condition_visual(scene: W.Scene, condition: str, cfg: W.WorldConfig = W.WorldConfig()) -> VisualInput:
    """The scene's video under a condition (real / blank / shuffled), preprocessed as its mp4 would be."""
    frames = W.ablate(W.render(scene, cfg), condition, seed=scene.seed)
    return W.visual_from_frames(frames, cfg, roundtrip=True)


@graph_jit(graphs=("graphdef",), static_argnames=("graphdef", "impl"))
def extend(graphdef, params, cache: KVCache, tokens_BN, len_B, rope_delta_B, *, impl: AttentionImpl = XLA):
    """Append row b's first len_B[b] tokens to its committed prompt, as a causal chain at the next text
    positions (what a longer prompt would have there). Returns the new cache (the given one is kept, so
    several questions can continue one prefilled video) and the logits after each row's last token."""
    model = nnx.merge(graphdef, params)
    B, N = tokens_BN.shape
    pos_BN = cache.lengths_B[:, None] + jnp.arange(N)[None] + rope_delta_B[:, None]
    chain_NN = jnp.tril(jnp.ones((N, N), bool))
    v = tg.verify_fn(model, cache, tokens_BN, pos_BN, chain_NN, impl)
    new = commit_cache(cache, v.block_kv, jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32), (B, N)), len_B)
    last_BV = jnp.take_along_axis(v.logits_BNV, (len_B - 1)[:, None, None], axis=1)[:, 0]
    return new, last_BV


@dataclasses.dataclass
class Asker:
    """A target, its codec and vision token ids: answers questions about batches of videos."""

    model: object
    codec: object
    impl: AttentionImpl = XLA

    def __post_init__(self):
        cfg = self.model.cfg
        self.ids = VisionTokenIds(cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.image_token_id,
                                  cfg.video_token_id)
        self.graphdef, self.params = nnx.split(self.model)
        self.eos = tuple(cfg.eos_token_ids)

    def question_ids(self, question: str) -> list[int]:
        """The tokens after the video in `world.chat_prompt` (question + assistant prefix)."""
        return self.codec.encode(question + QWEN_ASSISTANT_PREFIX)

    def answer(self, visuals: list[VisualInput], questions: list[list[str]], max_new: list[int]) -> list[list[list[int]]]:
        """Greedy answers: out[b][j] = tokens answering questions[b][j] about visuals[b] (EOS included).
        Every row must ask the same number of questions; question j gets up to max_new[j] tokens."""
        B, J = len(visuals), len(max_new)
        if any(len(q) != J for q in questions) or len(questions) != B:
            raise ValueError(f"answer: need {J} questions for each of {B} videos")
        cfg = self.model.cfg
        prefix = [build_multimodal_prompt([self.codec.encode(QWEN_USER_PREFIX), v], self.ids) for v in visuals]
        batch = prepare_batch_for(cfg)(prefix, cfg)
        q_ids = [[self.question_ids(q) for q in row] for row in questions]
        N = tg.bucket(max(len(t) for row in q_ids for t in row), QUESTION_BUCKET)
        tg.check_context(batch, cfg.text, N + max(max_new))
        capacity = cache_capacity(batch.input_ids_BT.shape[1] + N, max(max_new))
        pre = tg.prefill(self.graphdef, self.params, batch, capacity=capacity, m_star=tg.default_m_star(cfg.num_layers),
                         impl=self.impl)
        out = [[None] * J for _ in range(B)]
        for j in range(J):
            toks = np.zeros((B, N), np.int32)
            for b in range(B):
                toks[b, :len(q_ids[b][j])] = q_ids[b][j]
            lens = np.asarray([len(q_ids[b][j]) for b in range(B)], np.int32)
            cache, logits = extend(self.graphdef, self.params, pre.cache, jnp.asarray(toks), jnp.asarray(lens),
                                   pre.rope_delta_B, impl=self.impl)
            res = ar_generate(self.graphdef, self.params, cache, logits, pre.rope_delta_B, jax.random.key(0),
                              max_new_tokens=max_new[j], sampling=SamplingParams(), eos_ids=self.eos, impl=self.impl)
            t, n = np.asarray(res.tokens_BM), np.asarray(res.num_tokens_B)
            for b in range(B):
                out[b][j] = t[b, :n[b]].tolist()
        return out

    def text(self, ids) -> str:
        return self.codec.decode([i for i in ids if i not in self.eos])


def score_video(scene: W.Scene, items: list[W.QA], texts: list[str]) -> dict:
    """One video's record: the caption's component scores and each question's 0/1 score."""
    cap = W.score_caption(scene, texts[0])
    qa = [{"kind": q.kind, "question": q.question, "truth": q.answer, "answer": t, "score": W.score_answer(scene, q, t)}
          for q, t in zip(items[1:], texts[1:])]
    return {"caption": {"text": texts[0], "truth": items[0].answer, "scores": cap}, "qa": qa}


def summarize(records: list[dict]) -> dict:
    """Mean caption components (over the videos where the scorer could check them, with counts) and
    answer accuracy per question kind, for one (length, condition) group."""
    cap, qa = {}, {}
    for r in records:
        for k, v in r["caption"]["scores"].items():
            cap.setdefault(k, []).append(v)
        for q in r["qa"]:
            qa.setdefault(q["kind"], []).append(q["score"])
    all_qa = [q["score"] for r in records for q in r["qa"]]
    stat = lambda v: {"mean": float(np.mean(v)), "n": len(v),  # noqa: E731
                      "stderr": float(np.std(v) / np.sqrt(len(v))) if len(v) > 1 else float("nan")}
    return {"videos": len(records), "caption": {k: stat(v) for k, v in sorted(cap.items())},
            "qa": {k: stat(v) for k, v in sorted(qa.items())}, "qa_overall": stat(all_qa) if all_qa else None}

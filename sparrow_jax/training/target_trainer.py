"""Target training (`train.py --set task=target`): a target of the Qwen2.5-VL architecture — vision
tower and LM together — trained from scratch (or from `target`) with next-token cross-entropy on the
answer (assistant) tokens.

It is the draft Trainer with another model and loss: the same optimizer factory, mesh and logical-axis
sharding, gradient accumulation, orbax checkpoints with exact resume (parameters, optimizer, step,
RNG, data iterator), run loop and JSONL/TensorBoard logs. Data are raw samples (prompt with visuals +
response ids) from the source named by the config's `data` (synthetic/sources.py).

Static shapes (one compiled step per bucket): a batch's shapes are fixed by its samples' visual grids
(pixel rows, vision-layout segments, visual token count) and by `max_text`. Samples are grouped into
buckets by the tuple of their grids (`buckets_of`); every step draws its whole global batch from one
bucket, chosen by a seeded draw per step with probability proportional to the bucket's size (short
clips at one grid and a small share of long videos at another give two buckets and two compiles). A
bucket's sequence is padded to T = its visual tokens + max_text (text counts the vision start/end
markers), and the loss positions (those whose next token is an answer token) to max_text. Few distinct
grids, few compiles: the data source should give its videos a handful of grids.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sparrow_jax.models import registry
from sparrow_jax.models import target as tg
from sparrow_jax.models.attention import XLA, AttentionImpl
from sparrow_jax.synthetic.sources import sample_source
from sparrow_jax.training import sharding as shd
from sparrow_jax.training.data import index_pipeline, sample_sequence
from sparrow_jax.training.trainer import Trainer, TrainConfig, accumulate_and_update, load_target, make_optimizer

# Tokenizer files an exported directory carries when `tokenizer_dir` is set (those present are copied).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                   "preprocessor_config.json", "video_preprocessor_config.json")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TargetBatch:
    """B samples of one bucket, fixed shapes (L = max_text)."""

    inputs: tg.PrefillBatch  # prompt + response, right-padded to T = visual tokens + L
    loss_idx_BL: jax.Array  # positions whose next token is an answer token (right-padded with 0)
    labels_BL: jax.Array  # that next token
    weight_BL: jax.Array  # 1.0 for a real loss position, 0.0 for padding
    first_BL: jax.Array  # 1.0 at each sample's first answer token (the content word of short answers)


def bucket_key(sample) -> tuple:
    """A sample's shape signature: the grids of its visuals, in order."""
    return tuple(tuple(int(g) for g in v.grid_thw) for v in sample.prompt.visuals)


def buckets_of(samples) -> dict[tuple, list[int]]:
    """Sample indices grouped by bucket key. A lazy dataset with `grid(i)` (one video per item, e.g.
    synthetic.world.WorldDataset) is keyed without rendering its items."""
    out: dict[tuple, list[int]] = {}
    for i in range(len(samples)):
        key = (tuple(int(g) for g in samples.grid(i)),) if hasattr(samples, "grid") else bucket_key(samples[i])
        out.setdefault(key, []).append(i)
    return out


def text_budget(max_text: int, per_visual: float, n_visual: int) -> int:
    """Text positions a bucket pads to: `max_text` plus `per_visual` per visual token (answers about
    long videos are longer), rounded up to a multiple of 8 when that adds anything."""
    extra = int(np.ceil(per_visual * n_visual))
    return max_text if extra == 0 else -(-(max_text + extra) // 8) * 8


def target_batch(samples, model_cfg, *, max_text: int, per_visual: float = 0.0, prepare=None) -> TargetBatch:
    """Host: samples of one bucket -> a TargetBatch. Text (prompt text + markers + answer) beyond
    the bucket's text budget (`text_budget`) is an error: raise the config's limit."""
    seqs = [sample_sequence(s) for s in samples]
    n_vis = {int(np.count_nonzero(np.asarray(q.mm_token_type_ids))) for q, _ in seqs}
    if len(n_vis) != 1:
        raise ValueError(f"batch mixes visual lengths {sorted(n_vis)}: batch samples of one bucket")
    B, L = len(seqs), text_budget(max_text, per_visual, next(iter(n_vis)))
    loss_idx, labels = np.zeros((B, L), np.int32), np.zeros((B, L), np.int32)
    weight, first = np.zeros((B, L), np.float32), np.zeros((B, L), np.float32)
    for b, (q, assistant) in enumerate(seqs):
        n_text = len(q.input_ids) - next(iter(n_vis))
        if n_text > L:
            raise ValueError(f"sample {b}: {n_text} text tokens (prompt + answer) exceed max_text {max_text}"
                             + (f" + {per_visual} x {next(iter(n_vis))} visual tokens = {L}" if L != max_text else ""))
        pos = np.nonzero(assistant[1:])[0]
        loss_idx[b, :len(pos)], labels[b, :len(pos)] = pos, np.asarray(q.input_ids)[pos + 1]
        weight[b, :len(pos)] = 1.0
        first[b, 0] = float(len(pos) > 0)
    inputs = (prepare or registry.prepare_batch_for(model_cfg))([q for q, _ in seqs], model_cfg,
                                                        seq_bucket=next(iter(n_vis)) + L)
    # The text/visual index rows serve the draft; keep their data-dependent widths out of the step.
    zeros = jnp.zeros((B, 1), jnp.int32)
    inputs = dataclasses.replace(inputs, text_idx_BL=zeros, vis_idx_BM=zeros)
    return TargetBatch(inputs, *(jnp.asarray(x) for x in (loss_idx, labels, weight, first)))


def _answer_logits(model, batch: TargetBatch, impl: AttentionImpl = XLA, visual_feats=None):
    h_BTD, _, _ = tg.forward(model, batch.inputs, impl=impl, visual_feats=visual_feats)
    return model.logits(tg._gather_rows(h_BTD, batch.loss_idx_BL)).astype(jnp.float32)


def answer_token_stats(model, batch: TargetBatch, impl: AttentionImpl = XLA, visual_feats=None):
    """([B, L] cross-entropy, [B, L] top-1 hit) of each answer slot (padding slots included; weight_BL
    says which count): one forward serves any weighting of the answer tokens."""
    logits_BLV = _answer_logits(model, batch, impl, visual_feats)
    ce_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV, batch.labels_BL)
    return ce_BL, (jnp.argmax(logits_BLV, -1) == batch.labels_BL).astype(jnp.float32)


def weighted_sums(ce_BL, hit_BL, weight_BL, first_BL) -> dict:
    """Summed cross-entropy and top-1 hits over the tokens weight_BL selects, and their counts (jnp or np)."""
    return {"ce": (ce_BL * weight_BL).sum(), "hits": (hit_BL * weight_BL).sum(),
            "first_hits": (hit_BL * first_BL).sum(), "tokens": weight_BL.sum(), "answers": first_BL.sum()}


def answer_sums(model, batch: TargetBatch, impl: AttentionImpl = XLA, visual_feats=None) -> dict:
    """Summed cross-entropy and top-1 hits over the answer tokens, and their counts."""
    ce_BL, hit_BL = answer_token_stats(model, batch, impl, visual_feats)
    return weighted_sums(ce_BL, hit_BL, batch.weight_BL, batch.first_BL)


def answer_metrics(s: dict) -> dict:
    """loss (mean CE per answer token), top1 (per answer token), first_top1 (first answer token)."""
    n, a = jnp.maximum(s["tokens"], 1.0), jnp.maximum(s["answers"], 1.0)
    return {"loss": s["ce"] / n, "top1": s["hits"] / n, "first_top1": s["first_hits"] / a}


def pixel_targets(pixels_PC, vcfg, pool: int = 7):
    """Per merged visual token: its pixels averaged over pool x pool blocks, per channel and frame
    ([N, merge^2 * C * tp * (p/pool)^2]). Rows of pixels_PC come merge unit by merge unit (the Qwen
    processor's patch order), each (C, tp, p, p)."""
    p, m, tp, c = vcfg.patch_size, vcfg.spatial_merge_size, vcfg.temporal_patch_size, vcfg.in_channels
    if p % pool:
        raise ValueError(f"pixel_targets: pool {pool} does not divide patch size {p}")
    x = pixels_PC.astype(jnp.float32).reshape(-1, m * m, c, tp, p // pool, pool, p // pool, pool).mean((5, 7))
    return x.reshape(x.shape[0], -1)


def probe_unexplained(feats_ND, targets_NK, ridge: float = 0.1):
    """The share of the targets' variance (centred over tokens) that the best ridge-regularised linear
    map from the RMS-normalised features leaves unexplained. The LM reads visual tokens through an
    RMSNorm, so the features are normalised first, and the ridge is absolute on that scale: features
    that are one shared direction plus a small per-token wiggle (what the LM can barely see) score
    near 1 however well the wiggle encodes the pixels; features that vary substantially score near 0.
    Differentiable in the features."""
    F = feats_ND.astype(jnp.float32)
    F = F * jax.lax.rsqrt(jnp.mean(F**2, -1, keepdims=True) + 1e-6)
    Y = targets_NK - targets_NK.mean(0)
    G = F.T @ F
    lam = ridge * F.shape[0]  # trace(G) / D = N for unit-RMS rows
    W = jnp.linalg.solve(G + lam * jnp.eye(G.shape[0], dtype=G.dtype), F.T @ Y)
    return jnp.sum((Y - F @ W) ** 2) / jnp.maximum(jnp.sum(Y**2), 1e-12)


def reinit_vision(model, seed: int, out_scale: float = 1.0) -> None:
    """Replace the vision tower (and merger) by a freshly initialised one (seed), its output layer
    scaled by `out_scale` and its bias zeroed — a restart for a tower that collapsed while the LM
    keeps what it learned. In place."""
    model.visual = registry.build_target(model.cfg, rngs=nnx.Rngs(seed)).visual
    fc2 = model.visual.merger.fc2
    fc2.kernel.set_value(fc2.kernel.get_value() * out_scale)
    if fc2.bias is not None:
        fc2.bias.set_value(jnp.zeros_like(fc2.bias.get_value()))


class BucketedIndices:
    """Global batches of sample indices, each from one bucket (see the module doc). Iterator state =
    per-bucket grain iterator states + the draw count, JSON (exact resume, like a grain iterator)."""

    def __init__(self, buckets: dict[tuple, np.ndarray], global_batch: int, seed: int):
        if not buckets:
            raise ValueError("no training samples")
        self.keys = sorted(buckets)
        self.members = [np.asarray(buckets[k]) for k in self.keys]
        for k, m in zip(self.keys, self.members):
            if len(m) < global_batch:
                raise ValueError(f"bucket {k} (visual grids): {len(m)} samples cannot fill a global batch of "
                                 f"{global_batch}")
        self.iters = [index_pipeline(len(m), global_batch, seed + i) for i, m in enumerate(self.members)]
        sizes = np.asarray([len(m) for m in self.members], np.float64)
        self.p, self.seed, self.count = sizes / sizes.sum(), seed, 0

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        k = int(np.random.default_rng((self.seed, self.count)).choice(len(self.iters), p=self.p))
        self.count += 1
        return self.members[k][np.asarray(next(self.iters[k]))]

    def get_state(self) -> dict:
        return {"count": self.count, "buckets": [it.get_state() for it in self.iters]}

    def set_state(self, state: dict) -> None:
        self.count = int(state["count"])
        for it, s in zip(self.iters, state["buckets"], strict=True):
            it.set_state(s)


class TargetTrainer(Trainer):
    """Trains the whole target; `samples` default to `cfg.num_samples` from the source `cfg.data`."""

    progress_metrics = ("loss", "top1", "first_top1")

    def __init__(self, cfg: TrainConfig, *, samples=None, log=print):
        if cfg.task != "target":
            raise ValueError(f"TargetTrainer needs task='target', got {cfg.task!r}")
        if cfg.global_batch % cfg.grad_accum:
            raise ValueError(f"global_batch {cfg.global_batch} not divisible by grad_accum {cfg.grad_accum}")
        self.cfg, self.log = cfg, log
        self.mesh = shd.make_mesh(cfg.mesh)
        model = load_target(cfg)
        if cfg.reinit_vision_seed is not None:
            reinit_vision(model, cfg.reinit_vision_seed, cfg.vision_out_scale)
        self.model_cfg = model.cfg
        self.graph, params = nnx.split(model, nnx.Param)
        self.optimizer = make_optimizer(cfg)
        self._init_trainable(params)
        self.tparams = None  # nothing frozen: the run loop's frozen-parameter argument stays empty
        self.rng = self._initial_rng()
        self.step = 0
        if samples is None:
            samples = sample_source(cfg.data)(model.cfg, cfg.num_samples, seed=cfg.data_seed, **cfg.data_options)
        self.samples = samples
        self.data_iter = BucketedIndices(buckets_of(samples), cfg.global_batch, cfg.data_seed)
        self._step_fn = self._build_step()
        impl = cfg.attention_impl
        self._sums_fn = jax.jit(lambda params, batch: answer_sums(nnx.merge(self.graph, params), batch, impl))
        self._ckpt = None

    def _build_step(self):
        cfg, graph, optimizer, A = self.cfg, self.graph, self.optimizer, self.cfg.grad_accum
        impl = cfg.attention_impl
        compute = jnp.bfloat16 if cfg.compute_dtype == "bfloat16" else jnp.float32

        def micro_loss(params, batch: TargetBatch):
            model = nnx.merge(graph, jax.tree.map(lambda x: x.astype(compute), params))
            inputs = batch.inputs
            has_visuals = inputs.pixels_PC is not None  # a text-only bucket has no vision tower pass
            feats = model.encode_visuals(inputs.pixels_PC, inputs.vision_layout, impl) if has_visuals else None
            m = answer_metrics(answer_sums(model, batch, impl=impl, visual_feats=feats))
            loss = m["loss"]
            if cfg.vision_aux_weight and has_visuals:
                # A vision tower trained from scratch through the LM alone collapses to one vector for
                # every token (the LM uses visual positions as attention sinks); a linear probe that must
                # recover each token's pixels from its features keeps them informative.
                m["vision_unexplained"] = probe_unexplained(feats, pixel_targets(inputs.pixels_PC,
                                                                                 model.cfg.vision))
                loss = loss + cfg.vision_aux_weight * m["vision_unexplained"]
            return loss, m

        def step(params, opt_state, _frozen, rng, batch_A: TargetBatch):
            """batch_A: A micro-batches stacked on a leading axis (a TargetBatch is not row-sliceable:
            its pixels and vision layout are per batch, not per row)."""
            params, opt_state, m = accumulate_and_update(
                jax.value_and_grad(micro_loss, has_aux=True), optimizer, params, opt_state, A,
                lambda i: (jax.tree.map(lambda x: x[i], batch_A),))
            return params, opt_state, rng, m

        rep = shd.replicated(self.mesh)
        return jax.jit(step, donate_argnums=(0, 1), out_shardings=(self.p_shard, self.o_shard, rep, rep))

    def next_batch(self) -> TargetBatch:
        """The next global batch as A stacked micro-batches, built on every process (the vision tower
        needs all pixels) and replicated over the mesh."""
        idx = next(self.data_iter)
        A = self.cfg.grad_accum
        micro = [target_batch([self.samples[i] for i in rows], self.model_cfg, max_text=self.cfg.max_text,
                              per_visual=self.cfg.max_text_per_visual) for rows in np.split(idx, A)]
        # which bucket the step drew (its visual tokens per row): step times differ ~70x between buckets
        dest, rows = micro[0].inputs.visual_dest, len(idx) // A
        self.step_info = {"visual_tokens": 0 if dest is None else int(dest.shape[0]) // rows}
        stacked = jax.tree.map(lambda *xs: np.stack(xs), *micro)
        with jax.set_mesh(self.mesh):
            return jax.device_put(stacked, shd.replicated(self.mesh))

    # ------------------------------------------------------------------------------- outputs

    def model(self):
        return nnx.merge(self.graph, jax.device_get(self.params))

    def evaluate(self, samples, batch_size: int | None = None) -> dict:
        """loss / top1 / first_top1 over held-out samples (no update), batched within buckets; a short
        last batch is padded with weight-0 rows so every batch of a bucket has one shape."""
        bs = batch_size or self.cfg.global_batch
        total = None
        params = jax.device_get(self.params)
        for group in ([samples[i] for i in idx] for idx in buckets_of(samples).values()):
            for i in range(0, len(group), bs):
                chunk = group[i:i + bs]
                n = len(chunk)
                batch = target_batch(chunk + [chunk[0]] * (bs - n), self.model_cfg, max_text=self.cfg.max_text,
                                     per_visual=self.cfg.max_text_per_visual)
                keep = (jnp.arange(bs) < n)[:, None]
                batch = dataclasses.replace(batch, weight_BL=batch.weight_BL * keep, first_BL=batch.first_BL * keep)
                s = self._sums_fn(params, batch)
                total = s if total is None else jax.tree.map(jnp.add, total, s)
        return {k: float(v) for k, v in answer_metrics(total).items()}

    def export(self, out_dir) -> Path:
        self.check_finite_params("target")
        out = export_hf(self.model(), out_dir, tokenizer_dir=self.cfg.tokenizer_dir)
        if hasattr(self.samples, "save_settings"):  # the world's scene settings, for demos and benches
            self.samples.save_settings(out)
        return out


def export_hf(model, out_dir, *, tokenizer_dir=None) -> Path:
    """A HF checkpoint directory transformers loads: config.json + model.safetensors (the family's
    saver), generation_config.json with the EOS ids, and the tokenizer files of `tokenizer_dir`."""
    out = Path(out_dir)
    registry.save_target(model, out)
    eos = list(getattr(model.cfg, "eos_token_ids", ()))
    gen = {"eos_token_id": eos, "pad_token_id": eos[0]} if eos else {}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    if tokenizer_dir:
        src = Path(tokenizer_dir)
        files = [src / f for f in TOKENIZER_FILES if (src / f).is_file()]
        if not files:
            raise FileNotFoundError(f"tokenizer_dir {src}: none of {list(TOKENIZER_FILES)} found")
        for f in files:
            shutil.copy2(f, out / f.name)
    return out

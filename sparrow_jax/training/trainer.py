"""Sparrow draft trainer: optax AdamW (warm-up + cosine decay, clipping, accumulation), a (data, fsdp,
tensor) mesh with logical-axis sharding, jit with NamedShardings, orbax checkpoints that restore
parameters, optimizer, step, RNG and the data iterator exactly, JSON-lines + TensorBoard logs.

Data: offline feature shards (`features` dir) or online (`online: true`: the frozen target runs inside
the train step on raw samples; nothing is written). Multi-host: `jax.distributed.initialize` (see
train.py); every process draws the same global batch of record indices and loads only its own rows —
online too: a process reads and lays out only its rows' videos, and the target's forward runs split
over the data axes like the draft step (its parameters placed by their declared axes, heads / MLP on
`tensor`), never replicated.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from sparrow_jax.io.draft_checkpoint import load_draft
from sparrow_jax.models import registry, views
from sparrow_jax.models.attention import IMPL_KINDS, AttentionImpl
from sparrow_jax.models.draft import DraftConfig, SparrowDraft
from sparrow_jax.models.target import default_m_star
from sparrow_jax.runtime import graph_jit
from sparrow_jax.training import checkpoint_guard as guard
from sparrow_jax.training import sharding as shd
from sparrow_jax.training.data import CurriculumBatches, ShardSource, SlotSpec, TrainBatch, collate, index_pipeline, \
    process_rows
from sparrow_jax.training.features import FeatureSpec, OnlineBatch, fill_features, online_batch, reference_unit
from sparrow_jax.training.losses import LossConfig, draft_loss


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    out_dir: str = "runs/draft"
    # draft: a Sparrow draft against a frozen target (Trainer) | target: the target itself, vision tower
    # and LM, from scratch or from `target` (training/target_trainer.py)
    task: str = "draft"
    # target: a HF checkpoint dir, or a config.json for a random target (tests / smoke runs)
    target: str | None = None
    target_config: str | None = None
    target_seed: int = 0
    # data: offline feature dir, or online samples from a named source (synthetic/sources.py)
    features: str | None = None
    online: bool = False
    data: str = "synthetic"  # sample source: a name in synthetic/sources.SOURCES or "module:function"
    data_options: dict = dataclasses.field(default_factory=dict)  # the source's keyword arguments
    num_samples: int = 64  # online samples
    data_seed: int = 0
    # optimisation
    steps: int = 100
    global_batch: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    warmup: int = 10
    final_lr_fraction: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.0
    clip: float = 0.5
    compute_dtype: str = "float32"  # bfloat16: bf16 compute, fp32 master weights
    # model / loss
    draft_layers: int = 1
    # draft task: start from this draft directory (save_draft's layout) instead of a random draft, e.g. the
    # 8 s recipe's export trained further on long clips; its config must be the draft this run builds
    init_draft: str | None = None
    m_star: int | None = None  # bridge layer m* (target hidden state after layer m*); None = default_m_star
    max_text: int = 128
    max_text_per_visual: float = 0.0  # target task: extra text positions per visual token (long answers)
    # target task: weight of the vision tower's linear-probe pixel loss (target_trainer.probe_unexplained),
    # which keeps visual features informative while the LM learns to read them (0 = off)
    vision_aux_weight: float = 0.0
    # target task: start from `target` with a freshly initialised vision tower (this seed), its output
    # layer scaled by vision_out_scale (target_trainer.reinit_vision); None = keep the tower
    reinit_vision_seed: int | None = None
    vision_out_scale: float = 1.0
    max_visual: int = 256
    ivsb: bool = True
    mtp_steps: int = 2
    mtp_decay: float = 0.8
    p_w: float = 0.1
    v_w: float = 1.0
    noise_std: float = 0.0
    # IVSB bridge dropout: the probability that a training row sees no bridge (its visual slots out of the
    # draft's attention, so it trains in the decode view), drawn per row per step from the step's key;
    # against the draft reading the video from the bridged slots, a shortcut VATA decoding lacks
    ivsb_bridge_dropout: float = 0.0
    # The draft's visual view (models/views.py), stored in its config.json; the engine decodes it only in
    # that view. Sparrow: none + ivsb + mtp; plain EAGLE: none, ivsb=false, mtp_steps=0; "IVSB + MTP w/o
    # VATA": ivsb_mid; MSD-style: msd (ivsb ignored); pruned-visual: pruned (keep fraction, uniform/attention).
    visual_view: str = "none"
    visual_keep_fraction: float = 0.1  # pruned view: SpecVLM's drop rate 0.9
    visual_prune_by: str = "uniform"
    # MSD's curriculum (data option): text-only samples only for the first `curriculum_text_steps`
    # steps, then a visual share rising to 1 over `curriculum_ramp_steps` (both 0: off, plain shuffling)
    curriculum_text_steps: int = 0
    curriculum_ramp_steps: int = 0
    # draft attention: "xla" (dense, or blockwise with a custom VJP past the dense limit) or "pallas"
    # (the prefill kernel's custom VJP; shapes it cannot take fall back to xla, reason logged once);
    # a string in the config file, the step gets `attention_impl`
    attention: str = "xla"
    # parallelism, checkpoints, logs
    mesh: tuple[int, int, int] = (1, 1, 1)
    seed: int = 0
    save_every: int = 50
    keep: int = 3
    async_save: bool = True
    log_every: int = 10
    tensorboard: bool = True
    tokenizer_dir: str | None = None  # target task: tokenizer files copied into the exported HF directory

    def __post_init__(self):
        if self.task not in ("draft", "target"):
            raise ValueError(f"task {self.task!r}: expected 'draft' or 'target'")
        if self.attention not in IMPL_KINDS:
            raise ValueError(f"attention {self.attention!r}: expected one of {IMPL_KINDS}")
        views.check_prune(self.visual_keep_fraction, self.visual_prune_by, "TrainConfig")
        views.training_view(self.visual_view, self.ivsb)  # raises on an unknown or impossible combination
        p = self.ivsb_bridge_dropout
        if not (isinstance(p, (int, float)) and 0.0 <= p <= 1.0):
            raise ValueError(f"ivsb_bridge_dropout: a probability in [0, 1], got {p!r}")
        if p > 0 and not (self.ivsb and self.visual_view == "none"):
            raise ValueError(f"ivsb_bridge_dropout {p} drops IVSB's bridge so rows train in the decode view: it needs "
                             f"ivsb=true and visual_view 'none' (got ivsb={self.ivsb}, visual_view "
                             f"{self.visual_view!r})")

    @property
    def attention_impl(self) -> AttentionImpl:
        """`attention` as the value the models take (the kernels' default block sizes)."""
        return AttentionImpl.of(self.attention)

    @property
    def slots(self) -> SlotSpec:
        """The training layout: the draft's view (view none + IVSB trains on ivsb_mid's slots)."""
        return SlotSpec(views.training_view(self.visual_view, self.ivsb), self.visual_keep_fraction,
                        self.visual_prune_by)

    def feature_spec(self, m_star: int) -> FeatureSpec:
        """The target features this view trains on."""
        slots = self.slots
        return FeatureSpec(m_star, views.visual_state(slots.view),
                           scores=slots.view == "pruned" and slots.prune_by == "attention")

    @property
    def loss(self) -> LossConfig:
        return LossConfig(ivsb=self.ivsb, mtp_steps=self.mtp_steps, mtp_decay=self.mtp_decay, p_w=self.p_w,
                          v_w=self.v_w, noise_std=self.noise_std, bridge_dropout=float(self.ivsb_bridge_dropout))

    @classmethod
    def from_file_and_overrides(cls, path: str | None, overrides: list[str]) -> "TrainConfig":
        """JSON (or YAML) config file, then `key=value` overrides (values parsed as JSON when possible)."""
        d = {}
        if path:
            text = Path(path).read_text()
            if path.endswith((".yaml", ".yml")):
                import yaml  # noqa: PLC0415

                d = yaml.safe_load(text) or {}
            else:
                d = json.loads(text)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if not k.startswith("_")}  # "_comment" etc.: notes for readers
        for o in overrides:
            if "=" not in o:
                raise ValueError(f"override {o!r}: expected key=value")
            k, v = o.split("=", 1)
            try:
                d[k] = json.loads(v)
            except json.JSONDecodeError:
                d[k] = v
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; known: {sorted(fields)}")
        if "mesh" in d:
            d["mesh"] = tuple(d["mesh"])
        return cls(**d)


def load_target(cfg: TrainConfig):
    """The frozen target: a HF checkpoint of any supported family, or a random one from a config."""
    if cfg.target:
        return registry.load_target(cfg.target)
    path = cfg.target_config or str(Path(__file__).resolve().parents[2] / "configs" / "tiny.json")
    d, source = registry.read_config_dict(path)
    return registry.build_target(registry.config_from_dict(d, source), rngs=nnx.Rngs(cfg.target_seed))


def make_optimizer(cfg: TrainConfig):
    sched = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(cfg.warmup, 1), max(cfg.steps, cfg.warmup + 1),
                                               end_value=cfg.lr * cfg.final_lr_fraction)
    return optax.chain(optax.clip_by_global_norm(cfg.clip),
                       optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay))


def _agree_max(v):
    """The elementwise max of a host vector over processes (online batch shapes every process pads to)."""
    if jax.process_count() == 1:
        return v
    return np.asarray(multihost_utils.process_allgather(np.asarray(v))).max(axis=0)


def _rows(batch, i, n):
    return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, i * n, n, 0), batch)


def accumulate_and_update(grad_fn, optimizer, params, opt_state, A: int, micro_args):
    """One optimizer update from the mean gradient and metrics of `grad_fn(params, *micro_args(i))`
    over A micro-batches (gradient accumulation in one lax.scan). Returns (params, opt_state, metrics)."""
    _, m0 = jax.eval_shape(lambda: grad_fn(params, *micro_args(0)))[0]

    def acc(carry, i):
        g_sum, m_sum = carry
        (_, metrics), g = grad_fn(params, *micro_args(i))
        return (jax.tree.map(jnp.add, g_sum, g), jax.tree.map(jnp.add, m_sum, metrics)), None

    zeros_g = jax.tree.map(jnp.zeros_like, params)
    zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m0)
    (g, m), _ = jax.lax.scan(acc, (zeros_g, zeros_m), jnp.arange(A))
    g = jax.tree.map(lambda x: x / A, g)
    m = jax.tree.map(lambda x: x / A, m)
    updates, opt_state = optimizer.update(g, opt_state, params)
    m["grad_norm"] = optax.tree.norm(g)
    return optax.apply_updates(params, updates), opt_state, m


def initial_draft(path, dcfg: DraftConfig, target_cfg) -> SparrowDraft:
    """The draft saved at `path` as the starting point of a run that builds `dcfg` (fine-tuning); a draft of
    another shape, view or bridge layer is refused with the fields that differ (the run's config decides)."""
    draft = load_draft(path, target_cfg=target_cfg)
    have, want = dataclasses.asdict(draft.cfg), dataclasses.asdict(dcfg)
    diff = [f"{k}: {have[k]!r} in the file, {want[k]!r} in this run" for k in want if have[k] != want[k]]
    if diff:
        raise ValueError(f"init_draft {path}: not the draft this run trains ({'; '.join(diff)})")
    return draft


class Trainer:
    progress_metrics = ("loss", "pass0/top1")  # shown on the progress bar

    def __init__(self, cfg: TrainConfig, *, samples=None, log=print, target=None):
        """`target`: an already built target model (else `load_target(cfg)`)."""
        self.cfg, self.log = cfg, log
        self.mesh = shd.make_mesh(cfg.mesh)
        self.target = load_target(cfg) if target is None else target
        tcfg = self.target.cfg
        self.m_star = default_m_star(tcfg.num_layers) if cfg.m_star is None else cfg.m_star
        self.feature_spec = cfg.feature_spec(self.m_star)
        dcfg = DraftConfig.for_target(tcfg, num_layers=cfg.draft_layers, visual_view=cfg.visual_view,
                                      m_star=self.m_star, visual_keep_fraction=cfg.visual_keep_fraction,
                                      visual_prune_by=cfg.visual_prune_by)
        draft = SparrowDraft(dcfg, rngs=nnx.Rngs(cfg.seed)) if cfg.init_draft is None else \
            initial_draft(cfg.init_draft, dcfg, tcfg)
        self.dgraph, dparams = nnx.split(draft, nnx.Param)
        self.tgraph, tparams = nnx.split(self.target)
        self.optimizer = make_optimizer(cfg)
        self._init_trainable(dparams)
        with jax.set_mesh(self.mesh):
            self.t_shard = shd.state_shardings(tparams, self.mesh)
            self.tparams = jax.device_put(tparams, self.t_shard)
        self.rng = self._initial_rng()
        self.step = 0
        # Data.
        if cfg.online:
            if samples is None:
                raise ValueError("online training needs samples")
            self.samples = samples  # any sequence: only this process's rows are read (lazy sources render them)
            n_records = len(samples)
            self.visual_unit = reference_unit(samples, self.target.cfg)
        else:
            if cfg.features is None:
                raise ValueError("set `features` (offline shards) or `online: true`")
            self.source = ShardSource(cfg.features)
            n_records = len(self.source)
            problem = self.feature_spec.mismatch(self.source.meta)
            if problem:
                raise ValueError(f"{cfg.features}: {problem}; visual_view {cfg.visual_view!r} (ivsb={cfg.ivsb}) "
                                 f"trains on {self.feature_spec.meta()}: re-extract for this view")
        if cfg.curriculum_text_steps or cfg.curriculum_ramp_steps:
            visual = ([bool(np.any(np.asarray(s.prompt.mm_token_type_ids))) for s in samples] if cfg.online
                      else self.source.visual)
            self.data_iter = CurriculumBatches(visual, cfg.global_batch, cfg.data_seed, cfg.curriculum_text_steps,
                                               cfg.curriculum_ramp_steps)
        else:
            self.data_iter = index_pipeline(n_records, cfg.global_batch, cfg.data_seed)
        self._step_fn = self._build_step()
        self._ckpt = None

    def _init_trainable(self, params):
        """Shard the trainable parameters over the mesh and initialise the optimizer state there."""
        with jax.set_mesh(self.mesh):
            self.p_shard = shd.state_shardings(params, self.mesh)
            self.params = jax.device_put(params, self.p_shard)
            self.opt_state = self.optimizer.init(self.params)
            self.o_shard = jax.tree.map(lambda x: x.sharding, self.opt_state)

    # ------------------------------------------------------------------------------- the step

    def _build_step(self):
        cfg, lcfg, impl = self.cfg, self.cfg.loss, self.cfg.attention_impl
        dgraph, tgraph, optimizer, fspec = self.dgraph, self.tgraph, self.optimizer, self.feature_spec
        compute = jnp.bfloat16 if cfg.compute_dtype == "bfloat16" else jnp.float32
        A = cfg.grad_accum
        if cfg.global_batch % A:
            raise ValueError(f"global_batch {cfg.global_batch} not divisible by grad_accum {A}")
        mb = cfg.global_batch // A

        def micro_loss(dparams, tparams, batch: TrainBatch, key):
            target = nnx.merge(tgraph, jax.tree.map(lambda x: x.astype(compute), tparams))
            draft = nnx.merge(dgraph, jax.tree.map(lambda x: x.astype(compute), dparams))
            return draft_loss(draft, target.embed, target.logits, batch, lcfg, key, impl=impl)

        def step(dparams, opt_state, tparams, rng, batch):
            if isinstance(batch, OnlineBatch):
                batch = fill_features(nnx.merge(tgraph, tparams), batch, fspec)
            rng, key = jax.random.split(rng)
            keys = jax.random.split(key, A)
            dparams, opt_state, m = accumulate_and_update(
                jax.value_and_grad(micro_loss, has_aux=True), optimizer, dparams, opt_state, A,
                lambda i: (tparams, _rows(batch, i, mb), keys[i]))
            return dparams, opt_state, rng, m

        return jax.jit(step, donate_argnums=(0, 1),
                       out_shardings=(self.p_shard, self.o_shard, shd.replicated(self.mesh), shd.replicated(self.mesh)))

    def lower_step(self, batch):
        """The training step lowered for `batch` (not run): what it computes, e.g. which attention routes
        its forward and backward take (`pallas_kernels.dispatch.routes_in`)."""
        with jax.set_mesh(self.mesh):
            return self._step_fn.lower(self.params, self.opt_state, self.tparams, self.rng, batch)

    # ------------------------------------------------------------------------------------ data

    def next_batch(self):
        """The global batch as arrays sharded by rows over the data axes; each process reads (and, online,
        renders and lays out for the target) only its own rows."""
        idx = np.asarray(next(self.data_iter))
        cfg = self.cfg
        rows = idx[process_rows(cfg.global_batch, jax.process_index(), jax.process_count())]
        put = lambda x: jax.make_array_from_process_local_data(shd.batch_sharding(self.mesh, x.ndim), x)  # noqa: E731
        if cfg.online:
            ob = online_batch([self.samples[int(i)] for i in rows], self.target.cfg, L=cfg.max_text,
                              M=cfg.max_visual, slots=cfg.slots, unit=self.visual_unit, agree=_agree_max,
                              names=[f"sample {int(i)}" for i in rows])
            with jax.set_mesh(self.mesh):
                return jax.tree.map(put, ob)
        local = collate([self.source[int(i)] for i in rows], L=cfg.max_text, M=cfg.max_visual, spec=cfg.slots)
        return jax.tree.map(put, local)

    # ------------------------------------------------------------------------------ checkpoints

    def checkpoint_manager(self):
        if self._ckpt is None:
            opts = ocp.CheckpointManagerOptions(
                preservation_policy=ocp.checkpoint_managers.LatestN(n=self.cfg.keep),
                enable_async_checkpointing=self.cfg.async_save, create=True)
            self._ckpt = ocp.CheckpointManager(Path(self.cfg.out_dir).resolve() / "checkpoints", options=opts)
        return self._ckpt

    def _initial_rng(self):
        return jax.random.key(self.cfg.seed)

    def _state(self):
        return {"params": self.params, "opt": self.opt_state, "rng": jax.random.key_data(self.rng)}

    def save(self, force=False):
        """Save this step (async); the state's fingerprint travels in the checkpoint's metadata, and the
        files of the steps finalized before it are sealed with checksums (checkpoint_guard)."""
        mngr = self.checkpoint_manager()
        mngr.wait_until_finished()  # orbax would wait here anyway; the previous step is final, seal it
        self._seal_finalized()
        state = self._state()
        meta = {"step": self.step, "config": dataclasses.asdict(self.cfg),
                "fingerprint": guard.state_fingerprint(state, shd.replicated(self.mesh))}
        mngr.save(self.step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(self.data_iter.get_state()),
            meta=ocp.args.JsonSave(meta)), force=force)
        self._last_saved = self.step
        # Fault-injection hook for the resume tests: die while this (async) save is still being written.
        if os.environ.get("SPARROW_KILL_DURING_SAVE") == str(self.step):
            os.kill(os.getpid(), signal.SIGKILL)

    def _seal_finalized(self):
        """Write the file checksums of every finalized, unsealed step (process 0; no save in flight)."""
        if jax.process_index() != 0:
            return
        mngr = self.checkpoint_manager()
        mngr.reload()
        for step in mngr.all_steps():
            step_dir = Path(mngr.directory) / str(step)
            if step_dir.is_dir():
                guard.seal(step_dir)

    def restore_latest(self) -> bool:
        """Resume from the newest *finalized* checkpoint that verifies (orbax only lists committed ones,
        so a save interrupted mid-write is never loaded): its files match their checksums, orbax reads
        it, and the restored state matches the fingerprint saved with it. A damaged newer step is named
        in one line and moved to `<out_dir>/damaged_checkpoints/`; if no step verifies,
        CheckpointDamagedError says how to start over."""
        mngr = self.checkpoint_manager()
        root = Path(mngr.directory)
        mngr.reload()
        steps = sorted(mngr.all_steps(), reverse=True)
        if not steps:
            return False
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self._state())
        damaged, out = [], None
        for step in steps:
            problem = guard.verify_files(root / str(step))
            if problem is None:
                try:
                    out = mngr.restore(step, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(),
                        meta=ocp.args.JsonRestore()))
                except Exception as exc:  # noqa: BLE001 — orbax/tensorstore/JSON errors: name the damaged file
                    problem = guard.describe_failure(root / str(step), exc)
            if problem is None:
                saved = (out.meta or {}).get("fingerprint") if isinstance(out.meta, dict) else None
                if saved is None:
                    self.log(f"[train] checkpoint step {step} carries no checksum (an older version wrote it): "
                             "restored unverified")
                else:
                    problem = guard.fingerprint_mismatch(out.state, saved, shd.replicated(self.mesh))
            if problem is None:
                break
            self.log(f"[train] checkpoint step {step} is damaged: {problem}")
            damaged.append(step)
        else:
            listing = "; ".join(str(s) for s in damaged)
            raise guard.CheckpointDamagedError(
                f"no checkpoint in {root} verifies (damaged steps: {listing}; see the lines above). To start over "
                f"and keep them for inspection: mv {root} {root.parent / 'checkpoints.damaged'}")
        if damaged:
            if jax.process_index() == 0:
                for s in damaged:
                    dest = guard.move_aside(root / str(s), root.parent / "damaged_checkpoints")
                    self.log(f"[train] moved damaged step {s} to {dest}")
            if jax.process_count() > 1:
                multihost_utils.sync_global_devices("sparrow_damaged_checkpoints_moved")
            mngr.reload()
            self.log(f"[train] resuming from step {step}, the newest checkpoint that verifies")
        self.params, self.opt_state = out.state["params"], out.state["opt"]
        self.rng = jax.random.wrap_key_data(out.state["rng"])
        self.data_iter.set_state(out.data)
        self.step = int(out.meta["step"])
        self._last_saved = self.step
        return True

    # ------------------------------------------------------------------------------------ loop

    def run(self, steps: int | None = None, *, resume: bool = True, progress: bool = True,
            stop_at: int | None = None):
        """Train (resuming from the newest good checkpoint) until cfg.steps, or `steps` more steps, or step
        `stop_at` — the learning-rate schedule stays the one of cfg.steps, so a run stopped early at
        `stop_at` is exactly the first `stop_at` steps of the full run."""
        cfg = self.cfg
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if resume and self.restore_latest():
            self.log(f"[train] resumed at step {self.step}")
        if jax.process_index() == 0:  # steps past the resume point run again: keep one log line per step
            guard.trim_metrics(out / "metrics.jsonl", self.step)
        end = cfg.steps if steps is None else min(cfg.steps, self.step + steps)
        end = end if stop_at is None else min(end, stop_at)
        writer = self._tb_writer(out) if cfg.tensorboard and jax.process_index() == 0 else None
        history = []
        bar = tqdm(total=end, initial=self.step, desc="train", disable=not progress or jax.process_index() != 0)
        # Each step's loss and gradient norm are checked once the next batch is built (the host work
        # still overlaps the device step), and always before a save: a non-finite step stops the run.
        pending = None

        def check(pending):
            if pending is not None:
                step, m = pending
                try:
                    guard.check_finite(step, jax.device_get({k: m[k] for k in ("loss", "grad_norm") if k in m}),
                                       getattr(self, "_last_saved", None))
                except guard.NonFiniteError:
                    bar.close()
                    self.checkpoint_manager().wait_until_finished()  # the earlier, finite saves complete
                    self._seal_finalized()
                    raise

        with jax.set_mesh(self.mesh):
            while self.step < end:
                t0 = time.perf_counter()
                batch = self.next_batch()
                check(pending)
                self.params, self.opt_state, self.rng, metrics = self._step_fn(
                    self.params, self.opt_state, self.tparams, self.rng, batch)
                self.step += 1
                pending = (self.step, metrics)
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == end:
                    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    m.update(getattr(self, "step_info", {}), step=self.step, step_s=time.perf_counter() - t0)
                    history.append(m)
                    bar.set_postfix({k: f"{m[k]:.4f}" for k in self.progress_metrics if k in m})
                    if jax.process_index() == 0:
                        with open(out / "metrics.jsonl", "a") as f:
                            f.write(json.dumps(m) + "\n")
                        if writer is not None:
                            for k, v in m.items():
                                writer.scalar(k, v, self.step)
                if self.step % cfg.save_every == 0 or self.step == end:
                    check(pending)
                    pending = None
                    self.save(force=self.step == end)
        check(pending)
        bar.close()
        self.checkpoint_manager().wait_until_finished()
        self._seal_finalized()
        return history

    def check_finite_params(self, what: str = "model"):
        """Refuse to export non-finite weights (ValueError naming the first tensors)."""
        bad = guard.nonfinite_tensors(self.params)
        if bad:
            raise ValueError(f"{what}: {len(bad)} parameter tensor(s) hold NaN/Inf (first: {bad[0]}); refusing to "
                             f"export them")

    def _tb_writer(self, out: Path):
        try:
            from tensorboardX import SummaryWriter  # noqa: PLC0415
        except ImportError:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415
            except Exception:  # noqa: BLE001 — TensorBoard is optional
                return None
        w = SummaryWriter(str(out / "tensorboard"))

        class _W:
            def scalar(self, k, v, step):
                w.add_scalar(k, v, step)

        return _W()

    # ------------------------------------------------------------------------------- outputs

    def draft(self) -> SparrowDraft:
        return nnx.merge(self.dgraph, jax.device_get(self.params))

    def evaluate(self, records) -> dict:
        """Loss/top-1 per pass on held-out feature records (no update)."""
        cfg = self.cfg
        batch = collate(records, L=cfg.max_text, M=cfg.max_visual, spec=cfg.slots)
        target = nnx.merge(self.tgraph, jax.device_get(self.tparams))
        _, m = draft_loss(self.draft(), target.embed, target.logits, jax.tree.map(jnp.asarray, batch), cfg.loss)
        return {k: float(v) for k, v in m.items()}


@graph_jit(graphs=("dgraph", "tgraph"), static_argnames=("dgraph", "tgraph", "lcfg"))
def loss_on_batch(dgraph, dparams, tgraph, tparams, batch, lcfg: LossConfig):
    """The training loss of one batch (offline TrainBatch or OnlineBatch), no update."""
    target = nnx.merge(tgraph, tparams)
    if isinstance(batch, OnlineBatch):
        raise TypeError("fill features first")
    return draft_loss(nnx.merge(dgraph, dparams), target.embed, target.logits, batch, lcfg)

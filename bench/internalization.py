"""Visual semantic internalization of the target (the paper's Figure 3, for our target).

Held-out world scenes (test split), each shown as a video with the caption request (`world.scene_qa`'s
first item), in the chat template the target was trained on:

1. Visual-KV removal from decoder layer x on, x = 0..L (0-based; x = L removes nothing, x = 0 removes
   the visual KV everywhere): in layers >= x no query attends to a visual key
   (`target.visual_key_visibility`, threaded through prefill and every greedy decoding step), while
   layers < x run as usual. Against the unmodified target (the production path) we measure
   (a) how often the next token at the last prompt position stays the same, and the mean KL
       divergence there (nats, KL(normal || removed));
   (b) how often the greedy answer (--max-new-tokens, teacher-free, the removal applied while decoding)
       stays identical, the mean number of tokens before the first difference, and the world scorer's
       caption score of the answer (`world.score_caption` 'overall'; the answer is cut at
       --max-new-tokens, so scores are for comparing rows, not absolute caption quality).
2. Per decoder layer, on the unmodified forward: the mean cosine similarity of each visual position's
   layer output to its layer input (how much the layer still changes visual states; text positions
   beside them), and the attention mass of the last prompt token on the visual keys (mean over heads;
   the visual share of the keys is the uniform-attention reference).
3. A table, and the bridge layer m* the curve supports. x* = the smallest x such that next-token
   agreement stays >= 1 - --tolerance for every x' >= x: the text reads the visual KV of layers
   0..x*-1 only, built from hidden_states[0..x*-1]. IVSB's bridge hidden_states[m*] (m* = capture
   index, `target.default_m_star`: L//2+1) is then a visual state the text still reads iff
   1 <= m* <= x*-1; the script says whether the default lies in that range.

  python bench/internalization.py --target shipped/tiny-qwen2.5-vl
  python bench/internalization.py --target DIR --seconds 64 --scenes 16     # 1024 visual tokens per video

Default size: 32 scenes of 8 s (128 visual tokens), 24 new tokens, x = 0..L: one batch, L + 2 prefills
and generations and one analysis forward (a few minutes on 2 CPU cores for the 6-layer tiny target).
The removal runs on the dense attention path (memory ~ B*heads*T^2): keep --batch-tokens modest at long
lengths. One JSON line goes to --jsonl (command, machine, date, versions), the plot to --plot.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import environment, write_jsonl  # noqa: E402

RESULTS = HERE / "results"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, help="HF checkpoint directory of the target (with tokenizer.json)")
    ap.add_argument("--seconds", type=int, default=8, help="video length (8 s = 128 visual tokens, 64 s = 1024)")
    ap.add_argument("--scenes", type=int, default=32, help="held-out scenes (world test split)")
    ap.add_argument("--max-new-tokens", type=int, default=24, help="greedy answer length compared per x")
    ap.add_argument("--tolerance", type=float, default=0.05,
                    help="x* = first x from which next-token agreement stays >= 1 - tolerance")
    ap.add_argument("--batch-tokens", type=int, default=4096,
                    help="visual tokens per batch (rows = this / a video's tokens, 1..--max-batch)")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--jsonl", default=str(RESULTS / "internalization.jsonl"))
    ap.add_argument("--plot", default=str(RESULTS / "internalization.png"), help="PNG path ('' = none)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.seconds < 2 or args.scenes < 1 or args.max_new_tokens < 1 or args.max_batch < 1 or args.batch_tokens < 1:
        ap.error("--seconds >= 2, --scenes, --max-new-tokens, --max-batch and --batch-tokens >= 1 expected")
    if not 0 <= args.tolerance < 1:
        ap.error(f"--tolerance {args.tolerance}: expected a value in [0, 1)")
    target = Path(args.target)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (target / name).is_file():
            ap.error(f"--target {target}: no {name} (expected a HF checkpoint directory with the world's tokenizer)")
    return args


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def layer_stats_fn():
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from sparrow_jax.models import target as tg  # noqa: PLC0415

    @partial(jax.jit, static_argnames="graphdef")
    def layer_stats(graphdef, params, batch):
        """Per decoder layer i (0-based), per row, on the unmodified forward: mean cosine similarity of
        the layer's output to its input (hidden_states[i+1] vs [i]) over the visual and over the text
        positions, and the last prompt token's attention mass on the visual keys (mean over heads);
        [L, B] each, plus the visual share of each row's keys [B]."""
        model = nnx.merge(graphdef, params)
        L = model.cfg.num_layers
        _, kvs, hs = tg.forward(model, batch, capture=tuple(range(L + 1)))
        T = batch.input_ids_BT.shape[1]
        vis_BT = tg.visual_mask(batch)
        txt_BT = (jnp.arange(T)[None] < batch.lengths_B[:, None]) & ~vis_BT

        def mean_over(x_BT, m_BT):
            return (x_BT * m_BT).sum(-1) / jnp.maximum(m_BT.sum(-1), 1)

        cos_vis, cos_txt, att_vis = [], [], []
        for i in range(L):
            a, b = hs[i].astype(jnp.float32), hs[i + 1].astype(jnp.float32)
            cos_BT = (a * b).sum(-1) / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-12)
            cos_vis.append(mean_over(cos_BT, vis_BT))
            cos_txt.append(mean_over(cos_BT, txt_BT))
            att_vis.append((tg.last_token_attention(model, batch, hs[i], kvs[i][0], i) * vis_BT).sum(-1))
        share_B = vis_BT.sum(-1) / batch.lengths_B
        return jnp.stack(cos_vis), jnp.stack(cos_txt), jnp.stack(att_vis), share_B

    return layer_stats


def internalization_layer(agreement: list[float], tolerance: float) -> int:
    """x* = the smallest x with agreement[x'] >= 1 - tolerance for every x' >= x (len(agreement) - 1 at most)."""
    x = len(agreement) - 1
    while x > 0 and agreement[x - 1] >= 1 - tolerance:
        x -= 1
    return x


def verdict(x_star: int, L: int, m_default: int, agreement_at_0: float, tolerance: float) -> tuple[list | None, str]:
    """(supported m* range [lo, hi] or None, one-paragraph statement)."""
    if x_star == 0:
        return None, (f"removing the visual KV in every layer keeps {agreement_at_0:.0%} of next tokens (>= 1 - "
                      f"{tolerance}): the target does not use the video on these prompts, so the curve says "
                      f"nothing about m*; keep the default m* = {m_default}.")
    if x_star == 1:
        return None, (f"x* = 1: the text reads the visual KV of layer 0 only; no bridge state inside the stack "
                      f"(m* >= 1) is read by the text. The curve does not support the default m* = {m_default}.")
    lo, hi = 1, x_star - 1
    where = "inside" if lo <= m_default <= hi else "outside"
    bound = ("the text reads visual KV up to the last layer (no internalization point below L), so the curve "
             "bounds m* only by the stack" if x_star == L else
             f"visual KV can be removed from layer {x_star} of {L} on")
    return [lo, hi], (f"{bound}; bridge states the text still reads: hidden_states[m*] for m* in [{lo}, {hi}] "
                      f"(deepest {hi}). The default m* = L//2+1 = {m_default} lies {where} this range: "
                      f"{'supported' if where == 'inside' else 'NOT supported'} by the curve.")


def main(argv=None):
    args = parse_args(argv)
    import jax  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415
    from tqdm import tqdm  # noqa: PLC0415

    from sparrow_jax.decoding.autoregressive import ar_generate, cache_capacity  # noqa: PLC0415
    from sparrow_jax.decoding.sampling import SamplingParams  # noqa: PLC0415
    from sparrow_jax.io.text import load_codec  # noqa: PLC0415
    from sparrow_jax.io.vision_inputs import VisionTokenIds  # noqa: PLC0415
    from sparrow_jax.models import registry, target as tg  # noqa: PLC0415
    from sparrow_jax.synthetic import demo  # noqa: PLC0415
    from sparrow_jax.synthetic import world as W  # noqa: PLC0415

    t_start = time.perf_counter()
    target = Path(args.target)
    model = registry.load_target(target)
    cfg = model.cfg
    if cfg.family != "qwen2_5_vl":
        sys.exit(f"internalization.py: error: {target}: a {cfg.family} target; the world's videos are prepared "
                 "for Qwen2.5-VL targets")
    L = cfg.num_layers
    m_default = tg.default_m_star(L)
    codec = load_codec(target, cfg.text.vocab_size)
    ids = VisionTokenIds(cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.image_token_id, cfg.video_token_id)
    eos = tuple(cfg.eos_token_ids)
    graphdef, params = nnx.split(model)
    prepare = registry.prepare_batch_for(cfg)
    layer_stats = layer_stats_fn()
    wcfg = demo.target_world(target)
    V = wcfg.visual_tokens(args.seconds)
    scenes = [W.make_scene(s, args.seconds, wcfg) for s in W.split_seeds("test", args.scenes)]
    items = [W.scene_qa(sc)[0] for sc in scenes]  # the caption request
    per_batch = max(1, min(args.max_batch, args.batch_tokens // V, len(scenes)))
    chunks = [list(range(i, min(i + per_batch, len(scenes)))) for i in range(0, len(scenes), per_batch)]
    xs = list(range(L + 1))
    print(f"[internalization] target {target}: {L} decoder layers, default m* = {m_default}; {len(scenes)} held-out "
          f"scenes of {args.seconds} s ({V} visual tokens), caption request, {args.max_new_tokens} new tokens; "
          f"x = 0..{L}; batches of {per_batch}", flush=True)

    def run(batch, from_layer, capacity):
        """Last-position logits [B, V] and greedy tokens with visual KV removed from `from_layer` on."""
        T = batch.input_ids_BT.shape[1]
        vis = (lambda size: None) if from_layer is None else (
            lambda size: tg.visual_key_visibility(batch, from_layer, L, size))
        pre = tg.prefill(graphdef, params, batch, capacity=capacity, m_star=m_default, key_visible_LBS=vis(T))
        res = ar_generate(graphdef, params, pre.cache, pre.last_logits_BV, pre.rope_delta_B, jax.random.key(0),
                          max_new_tokens=args.max_new_tokens, sampling=SamplingParams(), eos_ids=eos,
                          key_visible_LBS=vis(capacity))
        toks, n = np.asarray(res.tokens_BM), np.asarray(res.num_tokens_B)
        return np.asarray(pre.last_logits_BV, np.float64), [toks[b, :n[b]].tolist() for b in range(len(n))]

    def text(tokens):
        return codec.decode([t for t in tokens if t not in eos])

    per_x = {x: {"same": [], "kl": [], "identical": [], "first_diff": [], "score": []} for x in xs}
    stats = {"cos_visual": [], "cos_text": [], "attn_visual": [], "visual_share": []}
    examples = []
    bar = tqdm(total=len(chunks) * (len(xs) + 2), unit="run", disable=args.no_progress)
    for chunk in chunks:
        bar.set_description("render")
        rows = chunk + [chunk[-1]] * (per_batch - len(chunk))  # one compiled shape for every batch
        prompts = [W.chat_prompt(codec, W.visual_from_frames(W.render(scenes[i], wcfg), wcfg, roundtrip=True),
                                 items[i].question, ids) for i in rows]
        batch = prepare(prompts, cfg)
        tg.check_context(batch, cfg.text, args.max_new_tokens)
        capacity = cache_capacity(batch.input_ids_BT.shape[1], args.max_new_tokens)
        bar.set_description("layer stats")
        cv, ct, av, share = (np.asarray(a) for a in layer_stats(graphdef, params, batch))
        n = len(chunk)
        stats["cos_visual"].append(cv[:, :n])
        stats["cos_text"].append(ct[:, :n])
        stats["attn_visual"].append(av[:, :n])
        stats["visual_share"].append(share[:n])
        bar.update()
        bar.set_description("normal")
        base_logits, base_toks = run(batch, None, capacity)
        bar.update()
        logp_base = base_logits - np.logaddexp.reduce(base_logits, axis=-1, keepdims=True)
        ex = {x: [] for x in xs}
        for x in xs:
            bar.set_description(f"x={x}")
            logits, toks = run(batch, x, capacity)
            logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
            kl = (np.exp(logp_base) * (logp_base - logp)).sum(-1)
            for b, i in enumerate(chunk):
                r, ref = per_x[x], base_toks[b]
                r["same"].append(float(np.argmax(logits[b]) == np.argmax(base_logits[b])))
                r["kl"].append(float(max(kl[b], 0.0)))
                r["identical"].append(float(toks[b] == ref))
                r["first_diff"].append(next((j for j, (u, v) in enumerate(zip(toks[b], ref)) if u != v),
                                            min(len(toks[b]), len(ref))))
                r["score"].append(W.score_caption(scenes[i], text(toks[b]))["overall"])
                ex[x].append(text(toks[b]))
            bar.update()
        if not examples:
            examples = [{"seed": scenes[chunk[0]].seed, "question": items[chunk[0]].question,
                         "truth": items[chunk[0]].answer, "normal": text(base_toks[0]),
                         "by_x": {x: ex[x][0] for x in xs}}]
    bar.close()

    def mean_se(v):
        v = np.asarray(v, np.float64)
        return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0

    rows = []
    for x in xs:
        r = per_x[x]
        score, score_se = mean_se(r["score"])
        rows.append({"x": x, "visual_kv_layers": f"0..{x - 1}" if x else "none",
                     "next_token_same": round(float(np.mean(r["same"])), 4),
                     "kl_nats": round(float(np.mean(r["kl"])), 5),
                     "answer_identical": round(float(np.mean(r["identical"])), 4),
                     "first_diff_tokens": round(float(np.mean(r["first_diff"])), 2),
                     "caption_score": round(score, 4), "caption_score_se": round(score_se, 4)})
    cos_vis = np.concatenate(stats["cos_visual"], 1).mean(1)
    cos_txt = np.concatenate(stats["cos_text"], 1).mean(1)
    att = np.concatenate(stats["attn_visual"], 1)
    share = float(np.concatenate(stats["visual_share"]).mean())
    layers = [{"layer": i, "cos_visual": round(float(cos_vis[i]), 4), "cos_text": round(float(cos_txt[i]), 4),
               "attn_visual": round(float(att[i].mean()), 4), "attn_visual_se": round(mean_se(att[i])[1], 4)}
              for i in range(L)]
    agreement = [r["next_token_same"] for r in rows]
    x_star = internalization_layer(agreement, args.tolerance)
    supported, statement = verdict(x_star, L, m_default, agreement[0], args.tolerance)
    at_m = rows[m_default]
    statement += (f" Removal from layer m* = {m_default} on keeps {at_m['next_token_same']:.0%} of next tokens and "
                  f"{at_m['answer_identical']:.0%} of answers.")
    if rows[-1]["next_token_same"] != 1.0 or rows[-1]["answer_identical"] != 1.0:
        print("WARNING: x = L (nothing removed) differs from the normal forward", file=sys.stderr)

    print(f"\n== visual-KV removal from layer x on ({len(scenes)} scenes, {V} visual tokens; reference: the "
          f"unmodified target) ==")
    hdr = (f"{'x':>3} {'visual KV in':>12} {'next tok same':>14} {'KL nats':>9} {'answer same':>12} "
           f"{'first diff':>11} {'caption score':>16}")
    print(hdr + "\n" + "-" * len(hdr))
    for r in rows:
        mark = " <- x*" if r["x"] == x_star else ""
        print(f"{r['x']:>3} {r['visual_kv_layers']:>12} {r['next_token_same']:>14.3f} {r['kl_nats']:>9.4f} "
              f"{r['answer_identical']:>12.3f} {r['first_diff_tokens']:>11.1f} "
              f"{r['caption_score']:>9.3f} ± {r['caption_score_se']:.3f}{mark}")
    print(f"\n== per decoder layer (unmodified forward; visual share of the keys {share:.3f}) ==")
    hdr = f"{'layer':>5} {'cos(out,in) visual':>19} {'cos(out,in) text':>17} {'last-token attn on visual':>26}"
    print(hdr + "\n" + "-" * len(hdr))
    for li in layers:
        mark = " <- m* (hidden_states[m*] = input of this layer)" if li["layer"] == m_default else ""
        print(f"{li['layer']:>5} {li['cos_visual']:>19.4f} {li['cos_text']:>17.4f} "
              f"{li['attn_visual']:>18.4f} ± {li['attn_visual_se']:.4f}{mark}")
    print(f"\nx* = {x_star} (tolerance {args.tolerance}): {statement}")
    if examples:
        e = examples[0]
        print(f"\nexample (seed {e['seed']}): {e['question']}\n  normal: {e['normal']}\n  x = 0:  {e['by_x'][0]}")

    env = environment()
    total_s = round(time.perf_counter() - t_start, 1)
    rec = {"bench": "internalization", **env, "target": str(target),
           "target_sha256": file_sha256(target / "model.safetensors"), "num_layers": L, "m_star_default": m_default,
           "seconds": args.seconds, "visual_tokens": V, "scenes": len(scenes), "split": "test",
           "question": "caption request (world.scene_qa(scene)[0])", "max_new_tokens": args.max_new_tokens,
           "tolerance": args.tolerance, "batch": per_batch, "rows": rows, "layers": layers,
           "visual_key_share": round(share, 4), "x_star": x_star, "m_star_supported": supported,
           "m_star_default_supported": bool(supported and supported[0] <= m_default <= supported[1]),
           "verdict": statement, "examples": examples, "total_s": total_s}
    write_jsonl(args.jsonl, rec)
    print(f"\n[internalization] wrote {args.jsonl} ({total_s} s)")
    if args.plot:
        plot(args.plot, rows, layers, share, x_star, m_default, L, env, f"{len(scenes)} scenes, {V} visual tokens")
    return rec


def plot(path, rows, layers, share, x_star, m_default, L, env, what):
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 4))
    x = [r["x"] for r in rows]
    ax1.plot(x, [r["next_token_same"] for r in rows], marker="o", label="next token same")
    ax1.plot(x, [r["answer_identical"] for r in rows], marker="s", label="greedy answer identical")
    ax1.errorbar(x, [r["caption_score"] for r in rows], yerr=[r["caption_score_se"] for r in rows], marker="^",
                 label="caption score of the answer")
    ax1.axvline(x_star, color="gray", ls="--", lw=1, label=f"x* = {x_star}")
    ax1.set_xlabel("visual KV removed from decoder layer x on")
    ax1.set_ylabel("share of prompts / score")
    ax1.set_ylim(-0.05, 1.15)
    ax1.set_title("(a) visual-KV removal")
    li = [r["layer"] for r in layers]
    ax2.plot(li, [r["cos_visual"] for r in layers], marker="o", label="visual positions")
    ax2.plot(li, [r["cos_text"] for r in layers], marker="s", label="text positions")
    ax2.set_xlabel("decoder layer")
    ax2.set_ylabel("cosine(layer output, layer input)")
    ax2.set_title("(b) how much each layer changes the states")
    ax3.bar(li, [r["attn_visual"] for r in layers], yerr=[r["attn_visual_se"] for r in layers], color="tab:orange",
            alpha=0.8, label="last prompt token -> visual keys")
    ax3.axhline(share, color="gray", ls=":", lw=1, label=f"visual share of keys ({share:.2f})")
    ax3.set_xlabel("decoder layer")
    ax3.set_ylabel("attention mass (mean over heads)")
    ax3.set_title("(c) attention to the video")
    for ax in (ax1, ax2, ax3):
        ax.axvline(m_default, color="tab:red", ls="--", lw=1, label=f"default m* = {m_default} (input of layer)")
    for ax in (ax1, ax2, ax3):
        ax.set_xticks(range(L + 1) if ax is ax1 else range(L))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Visual semantic internalization of the target ({L} layers; {what}; "
                 f"{env['machine'].split(',')[0]}, {env['backend']})", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()

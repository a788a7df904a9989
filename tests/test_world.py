"""The tiny video world: scenes are deterministic and well formed, frames show what the graph says,
captions/QA and the scorer agree with the graph, the mp4 reads back through the inference path with
the expected frame and token counts, and the long lengths reach their token counts."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from sparrow_jax.io.vision_inputs import preprocess_video, read_video
from sparrow_jax.synthetic import world as W

CFG = W.WorldConfig()
DURATIONS = (4, 8, 64, 1024)


def _scenes(n=25, durations=DURATIONS, split="train"):
    return [W.make_scene(s, d) for s in W.split_seeds(split, n) for d in durations]


def test_scene_and_frames_deterministic_by_seed():
    a, b = W.make_scene(5, 16), W.make_scene(5, 16)
    assert a == b and W.caption(a, 3) == W.caption(b, 3) and W.scene_qa(a, 2) == W.scene_qa(b, 2)
    assert np.array_equal(W.render(a), W.render(b))
    assert W.make_scene(6, 16) != a and W.make_scene(5, 17).objects != a.objects


def test_splits_disjoint():
    ranges = {k: W.split_seeds(k, hi - lo) for k, (lo, hi) in W.SPLITS.items()}
    for x, y in [("train", "validation"), ("train", "test"), ("validation", "test")]:
        assert max(ranges[x].start, ranges[y].start) >= min(ranges[x].stop, ranges[y].stop)
    train = {W.make_scene(s, 8) for s in W.split_seeds("train", 50)}
    assert not train & {W.make_scene(s, 8) for s in W.split_seeds("test", 50)}
    with pytest.raises(ValueError, match="validation"):
        W.split_seeds("validation", 10, offset=W.SPLITS["validation"][1])


def test_scene_graph_invariants():
    for sc in _scenes():
        D, names = sc.duration, [o.name for o in sc.objects]
        assert len(set(names)) == len(names)
        times = [e.time for e in sc.events]
        assert times == sorted(set(times)) and 1 <= times[0] and times[-1] <= D - 1
        assert times[-1] >= 0.75 * D  # something always happens late
        assert len({(e.kind, e.value) for e in sc.events}) == len(sc.events)
        for t in range(D + 1):
            assert 1 <= len(sc.visible(t)) <= CFG.max_visible
        if D >= 64:  # long videos: events in every quarter
            assert {int(4 * t / D) for t in times} == {0, 1, 2, 3}


def _packed(rgb):
    rgb = np.asarray(rgb, np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def test_frames_show_the_scene_graph():
    """Per frame: background = the graph's (times lighting), every foreground colour belongs to a
    visible object, each visible object is seen; straight movers move the stated way."""
    for sc in _scenes(6, (8, 64)):
        frames = W.render(sc)
        assert frames.shape == (CFG.num_frames(sc.duration), CFG.height, CFG.width, 3)
        seen, due = {}, {}  # colour -> frames it shows in / frames an object of that colour is visible
        for i, f in enumerate(frames):
            t = i / CFG.fps
            light = W.LIGHTING[sc.lighting_at(t)]
            bg = (np.asarray(W.BACKGROUNDS[sc.background_at(t)]) * light).astype(np.uint8)
            vals, counts = np.unique(_packed(f), return_counts=True)
            assert vals[counts.argmax()] == _packed(bg)
            allowed = {int(_packed((np.asarray(W.COLOURS[o.colour]) * light).astype(np.uint8))): o.colour
                       for o in sc.visible(t)}
            fg = set(vals.tolist()) - {int(_packed(bg))}
            assert fg <= set(allowed), (sc.seed, t)
            for c in set(allowed.values()):
                due[c] = due.get(c, 0) + 1
            for c in fg:
                seen[allowed[c]] = seen.get(allowed[c], 0) + 1
        assert all(seen.get(c, 0) >= 0.8 * n for c, n in due.items()), (sc.seed, seen, due)
    # Direction of motion, from the pixels of a lone object.
    for motion, axis, sign in (("left", 1, -1), ("right", 1, 1), ("up", 0, -1), ("down", 0, 1)):
        o = W.WorldObject("red", "square", "large", motion, (0.5, 0.5), (0.0, 0.0), 0, 8)
        v = [0.0, 0.0]
        v[axis] = 0.1 * sign
        sc = W.Scene(0, 8, (dataclasses.replace(o, velocity=tuple(v)),), "black", ())
        f = W.render(sc)
        pos = [np.nonzero((fr == W.COLOURS["red"]).all(-1))[axis].mean() for fr in f[:4]]
        assert np.all(np.sign(np.diff(pos)) == sign), motion


def test_captions_and_answers_score_one_against_their_scene():
    others = _scenes(25, DURATIONS, "validation")
    lower = []
    for sc, other in zip(_scenes(), others):
        for variant in (0, 1):
            s = W.score_caption(sc, W.caption(sc, variant))
            assert s["overall"] == 1.0 and all(v == 1.0 for v in s.values()), (sc.seed, s)
            for k in ("object", "colour", "shape", "size", "motion", "count", "event", "time", "background"):
                assert k in s
            for qa in W.scene_qa(sc, variant):
                assert W.score_answer(sc, qa, qa.answer) == 1.0, (sc.seed, qa)
        lower.append(W.score_caption(sc, W.caption(other))["overall"])
    assert max(lower) < 1.0 and np.mean(lower) < 0.6


def test_well_formed_separates_degenerate_captions_that_still_state_facts():
    """A degenerate caption of the kind a target writes past its training lengths names the right colour,
    background and count, so the fact scorer rates it well; its clauses are not the world's."""
    sc = W.make_scene(20000000, 1024, W.WorldConfig(max_visible=1, max_events=0, sprite_scale=2.0))
    o = sc.objects[0]
    degenerate = (f"A 64 a screen: the video on a {sc.background} background. In wall part. In screen: a screen: "
                  f"a screen: the video, one in1 object remains: the {o.name}. In wall.")
    s = W.score_caption(sc, degenerate)
    assert s["overall"] >= 0.5 and s["colour"] == 1.0
    assert s["well_formed"] < 0.3 and "well_formed" in s
    assert W.well_formed(W.caption(sc, 2)) == 1.0 and W.well_formed("") == 0.0
    # a true caption cut mid-sentence keeps its whole clauses
    cut = W.caption(sc)[:-10]
    assert 0.5 < W.well_formed(cut) < 1.0


def test_scorer_penalises_wrong_and_reordered_text():
    sc = next(s for s in _scenes(20, (64,)) if len(s.events) >= 4)
    assert W.score_caption(sc, "")["overall"] == 0.0
    sents = W._sentences(W.caption(sc))
    events = [i for i, s in enumerate(sents) if W.parse_text(s)["events"]]
    swapped = list(sents)
    swapped[events[0]], swapped[events[-1]] = sents[events[-1]], sents[events[0]]
    assert W.score_caption(sc, " ".join(swapped))["order"] < 1.0
    o = sc.objects[0]
    wrong_motion = next(m for m in W.MOTIONS if m != o.motion)
    qa = next(q for q in W.scene_qa(sc) if q.kind == "motion" and o.name in q.question)
    assert W.score_answer(sc, qa, W._MOTION_ANSWER[wrong_motion]) == 0.0
    count = next(q for q in W.scene_qa(sc) if q.kind == "count")
    assert W.score_answer(sc, count, f"{count.value + 1} objects.") == 0.0


def test_mp4_reads_back_through_the_inference_path(tmp_path):
    sc = W.make_scene(W.split_seeds("test", 1)[0], 8)
    frames = W.render(sc)
    path = W.write_scene_video(sc, tmp_path / "scene.mp4")
    video = read_video(path, CFG.vision_config())
    assert video.total_frames == len(frames) == CFG.num_frames(8) and len(video.frames) == len(frames)
    vis = preprocess_video(path, CFG.vision_config())
    assert vis.num_tokens == CFG.visual_tokens(8) == 128 and vis.grid_thw == (8, 8, 8)
    assert vis.second_per_grid_t == pytest.approx(2 / CFG.fps)
    same = W.visual_from_frames(frames, roundtrip=True)  # training's path == the file's, bit for bit
    assert same.grid_thw == vis.grid_thw and same.second_per_grid_t == vis.second_per_grid_t
    np.testing.assert_array_equal(same.pixel_values, vis.pixel_values)
    raw = W.visual_from_frames(frames, roundtrip=False)  # codec error is small at crf 18
    assert np.abs(raw.pixel_values - vis.pixel_values).mean() < 0.05


def test_token_arithmetic_and_long_lengths():
    for d in (4, 8, 20):
        assert W.visual_from_frames(W.render(W.make_scene(1, d))).num_tokens == CFG.visual_tokens(d)
    assert CFG.visual_tokens(W.LENGTHS["16k"]) >= 16384 and CFG.visual_tokens(W.LENGTHS["25k"]) >= 25000
    for name, d in W.LENGTHS.items():
        if name != "short":
            want = int(float(name[:-1]) * 1024)
            assert CFG.duration_for_tokens(want) == d and CFG.visual_tokens(d) >= want
    small = W.WorldConfig(height=56, width=56)
    assert small.visual_tokens(small.duration_for_tokens(16384)) >= 16384
    sc = W.make_scene(3, W.LENGTHS["16k"])  # a long scene (not rendered): late events carry answers
    late = [e for e in sc.events if e.time >= 0.75 * sc.duration]
    assert late and any(q.kind == "event" and q.value == (late[-1].kind, late[-1].value) for q in W.scene_qa(sc))


def test_ablations():
    f = W.render(W.make_scene(2, 8))
    assert not W.ablate(f, "blank").any() and W.ablate(f, "real") is f
    s = W.ablate(f, "shuffled", seed=1)
    pairs = lambda x: [x[i:i + 2].tobytes() for i in range(0, len(x), 2)]  # noqa: E731
    assert sorted(pairs(s)) == sorted(pairs(f)) and pairs(s) != pairs(f)
    with pytest.raises(ValueError, match="reversed"):
        W.ablate(f, "reversed")


def test_dataset_items_are_deterministic_and_shaped():
    from sparrow_jax.io.text import ByteCodec, QWEN_ASSISTANT_PREFIX, QWEN_USER_PREFIX
    from sparrow_jax.io.vision_inputs import VisionTokenIds

    class Codec(ByteCodec):  # bytes + one id for <|im_end|>
        def encode(self, text):
            parts = text.split("<|im_end|>")
            out = super().encode(parts[0])
            for p in parts[1:]:
                out += [300] + super().encode(p)
            return out

    ids = VisionTokenIds(301, 302, 303, 304)
    ds = W.WorldDataset(Codec(400), ids, 6, durations=(4, 8), seed=3, roundtrip=False)
    a, b = ds[2], ds[2]
    np.testing.assert_array_equal(a.prompt.input_ids, b.prompt.input_ids)
    assert a.response == b.response and a.response[-1] == 300
    for i in range(len(ds)):
        item = ds[i]
        assert item.prompt.visuals[0].grid_thw == ds.grid(i)
        n = item.prompt.visuals[0].num_tokens
        assert (item.prompt.input_ids == 304).sum() == n
        scene, qa = ds.spec(i)
        text = Codec(400).decode([t for t in item.prompt.input_ids if t < 300])
        assert text == (QWEN_USER_PREFIX + qa.question + QWEN_ASSISTANT_PREFIX).replace("<|im_end|>", "")
    with pytest.raises(IndexError):
        ds[6]
    # a frame cap: the 8 s clips are sampled at a lower rate, and grid(i) still names the item's shape
    capped = W.WorldDataset(Codec(400), ids, 6, durations=(4, 8), seed=3, roundtrip=False,
                            cfg=W.WorldConfig(max_frames=10))
    assert capped.cfg.sampled_frames(8) == 10 and capped.cfg.visual_tokens(8) == 5 * 16
    for i in range(len(capped)):
        assert capped[i].prompt.visuals[0].grid_thw == capped.grid(i)
    with pytest.raises(ValueError, match="max_frames 10 caps"):
        capped.cfg.duration_for_tokens(100)


def test_follow_up_questions_are_context_and_answers_are_targets():
    """qa_per_sample > 1: one video, several chat turns; the loss mask covers exactly the answers (each
    ending with <|im_end|>), the follow-up user turns are context, and the first turn is the k=1 item."""
    from sparrow_jax.io.text import ByteCodec
    from sparrow_jax.io.vision_inputs import VisionTokenIds
    from sparrow_jax.training.data import sample_sequence

    class Codec(ByteCodec):  # bytes + one id per chat special
        SPECIAL = {"<|im_end|>": 300, "<|im_start|>": 305}

        def encode(self, text):
            out, i = [], 0
            while i < len(text):
                tok = next((s for s in self.SPECIAL if text.startswith(s, i)), None)
                out += [self.SPECIAL[tok]] if tok else super().encode(text[i])
                i += len(tok) if tok else 1
            return out

    ids, codec = VisionTokenIds(301, 302, 303, 304), Codec(400)
    one = W.WorldDataset(codec, ids, 4, durations=(4,), seed=5, roundtrip=False)
    many = W.WorldDataset(codec, ids, 4, durations=(4,), seed=5, roundtrip=False, qa_per_sample=4)
    for i in range(4):
        scene, qas = many.specs(i)
        assert len(qas) == 4 and len({q.question for q in qas}) == 4 and qas[0] == one.spec(i)[1]
        item = many[i]
        np.testing.assert_array_equal(item.prompt.input_ids, one[i].prompt.input_ids)
        seq, assistant = sample_sequence(item)
        targets = np.asarray(seq.input_ids)[assistant]
        answers = [codec.encode(q.answer) + [300] for q in qas]
        assert targets.tolist() == [t for a in answers for t in a]
        context = [t for t, m in zip(item.response, item.response_mask) if not m]
        assert codec.decode([t for t in context if t < 256]).count("user") == 3
    with pytest.raises(ValueError, match="qa_per_sample"):
        W.WorldDataset(codec, ids, 4, qa_per_sample=0)


def test_world_dataset_kinds_keeps_only_those_questions():
    """kinds=(...) asks only questions of those kinds (the bootstrap stage of target training); without
    "caption" no caption is asked whatever caption_share says; without kinds the draws are unchanged."""
    ids = W.VisionTokenIds(301, 302, 303, 304)
    base = W.WorldDataset(None, ids, 30, durations=(8,), seed=2, caption_share=0.5)
    same = W.WorldDataset(None, ids, 30, durations=(8,), seed=2, caption_share=0.5, kinds=W.QA_KINDS)
    bg = W.WorldDataset(None, ids, 30, durations=(8,), seed=2, caption_share=0.9, kinds=("background",))
    mixed = W.WorldDataset(None, ids, 30, durations=(8,), seed=2, caption_share=0.5, qa_per_sample=3,
                           kinds=("caption", "colour", "background"))
    for i in range(30):
        assert base.specs(i) == same.specs(i)
        assert [q.kind for q in bg.specs(i)[1]] == ["background"]
        scene, qas = mixed.specs(i)
        assert {q.kind for q in qas[1:]} <= {"colour", "background"} and len({q.question for q in qas}) == len(qas)
    assert {mixed.specs(i)[1][0].kind for i in range(30)} == {"caption", "colour", "background"}
    with pytest.raises(ValueError, match="kinds"):
        W.WorldDataset(None, ids, 4, kinds=("colour", "smell"))


def test_sprite_scale_grows_the_sprites_and_reaches_the_source():
    """WorldConfig.sprite_scale multiplies sprite sides (area by its square); world_source takes it as
    data_options {"world": {...}}; an impossible scale is an error naming the field."""
    o = W.WorldObject("red", "square", "small", "still", (0.5, 0.5), (0.0, 0.0), 0, 8)
    sc = W.Scene(0, 8, (o,), "black", ())
    area = [int((W.render(sc, W.WorldConfig(sprite_scale=s))[0] == W.COLOURS["red"]).all(-1).sum()) for s in (1.0, 2.0)]
    assert area == [round(W.SIZES["small"] * s * CFG.height) ** 2 for s in (1.0, 2.0)] and area[1] > 3.5 * area[0]
    with pytest.raises(ValueError, match="sprite_scale"):
        W.WorldConfig(sprite_scale=4.0)
    from sparrow_jax.models import registry  # noqa: PLC0415

    root = Path(__file__).resolve().parent.parent
    tiny = registry.config_from_dict(*registry.read_config_dict(root / "configs" / "tiny.json"))
    ds = W.world_source(tiny, 2, world={"sprite_scale": 1.5})
    assert ds.cfg.sprite_scale == 1.5


def test_kinds_replace_a_scene_without_such_questions_keeping_the_grid():
    """A scene with no question of the chosen kinds is replaced by a later scene of the dataset (same
    duration, so grid(i) still names the item's bucket)."""
    ids = W.VisionTokenIds(301, 302, 303, 304)
    ds = W.WorldDataset(None, ids, 60, durations=(4, 8), seed=1, kinds=("colour",))
    plain = W.WorldDataset(None, ids, 60, durations=(4, 8), seed=1)
    replaced = 0
    for i in range(60):
        scene, qas = ds.specs(i)
        assert [q.kind for q in qas] == ["colour"] and ds.grid(i)[0] == ds.cfg.num_frames(scene.duration) // 2
        replaced += scene.seed != plain.specs(i)[0].seed
    assert replaced > 0  # some scenes have every shape twice or more and no colour question


def test_static_world_has_no_events_and_one_background():
    """max_events=0 (a reading curriculum's first stage): no entrances, exits, background or lighting
    changes, so the opening objects stay to the end; a negative count is an error naming the field."""
    cfg = W.WorldConfig(max_events=0, max_visible=1)
    for seed in range(20):
        sc = W.make_scene(seed, 8, cfg)
        assert sc.events == () and len(sc.objects) == 1 and sc.visible(8) == sc.visible(0)
        assert W.score_caption(sc, W.caption(sc))["overall"] == 1.0
        qas = W.scene_qa(sc)
        assert {q.kind for q in qas} >= {"colour", "shape", "size", "motion", "background"}
        assert all(W.score_answer(sc, q, q.answer) == 1.0 for q in qas)
    with pytest.raises(ValueError, match="max_events"):
        W.WorldConfig(max_events=-1)


def test_scene_settings_round_trip_and_reach_the_demo_world(tmp_path):
    """world.json (written beside a target trained on the world) carries its scene settings; the demo's
    world_config applies them on top of the target's preprocessing; a bad file names itself."""
    from sparrow_jax.synthetic import demo, tokenizer  # noqa: PLC0415

    trained = W.WorldConfig(sprite_scale=2.0, max_visible=2, max_events=3)
    W.save_scene_settings(tmp_path, trained)
    tokenizer.save_preprocessor_config(tmp_path, trained)
    assert demo.world_config(tmp_path / "video_preprocessor_config.json") == dataclasses.replace(
        trained, max_frames=W.WorldConfig().max_frames)
    assert demo.target_world(tmp_path).sprite_scale == 2.0 and demo.target_world(None) == W.WorldConfig()
    (tmp_path / W.WORLD_FILE).write_text('{"sprite_scale": 2.0, "colours": 3}')
    with pytest.raises(ValueError, match=r"world\.json.*colours"):
        demo.world_config(tmp_path / "video_preprocessor_config.json")
    (tmp_path / W.WORLD_FILE).write_text('{"sprite_scale": 9.0}')
    with pytest.raises(ValueError, match=r"world\.json.*sprite_scale"):
        W.scene_settings_from(tmp_path / W.WORLD_FILE)

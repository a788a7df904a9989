"""Dataset loaders on tiny fixture files in the public layouts (tests/fixtures/datasets): LLaVA-Video-178K,
ShareGPT4Video (caption and conversation layouts), VideoDetailCaption, MVBench, LongVideoBench; the
training samples they make for both target families; clear errors (file, line, record) for bad records;
the full-scale recipes load as TrainConfigs; the benchmark manifest -> decode.py script -> score loop."""

from __future__ import annotations

import inspect
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sparrow_jax.io.text import QWEN_ASSISTANT_PREFIX, load_codec
from sparrow_jax.models import registry
from sparrow_jax.synthetic.sources import sample_source
from sparrow_jax.synthetic.tokenizer import SHIPPED_DIR
from sparrow_jax.training import datasets as ds
from sparrow_jax.training.data import sample_sequence
from sparrow_jax.training.trainer import TrainConfig
from tests._tiny import hf_config_dict, our_config

FIXTURES = Path(__file__).parent / "fixtures" / "datasets"
ROOT = Path(__file__).resolve().parents[1]
LLAVA_DIR = "llava_video_178k/0_30_s_academic_v0_1"
LLAVA_JSON = f"{LLAVA_DIR}/0_30_s_academic_v0_1_cap_processed.json"
# Every video the fixture annotations point at (written by the test: no binaries in the repo).
VIDEOS = [f"{LLAVA_DIR}/academic_source/activitynet/v_Q9qOIQrb2Xg-Scene-001.mp4",
          f"{LLAVA_DIR}/academic_source/Charades/7UCHN.mp4", f"{LLAVA_DIR}/academic_source/NextQA/1164/4010069381.mp4",
          "sharegpt4video/videos/mixkit-a-red-square-42.mp4", "sharegpt4video/videos/pexels-blue-disc-7.mp4",
          "videodetailcaption/Test_Videos/v_p1QGn0IzfW0.mp4", "videodetailcaption/Test_Videos/v_yACg55C3IlM.mp4",
          "mvbench/video/star/Charades_v1_480/ZS9XR.mp4", "mvbench/video/star/Charades_v1_480/RA4ZK.mp4",
          "mvbench/video/perception/videos/video_10155.mp4", "longvideobench/videos/86CxyhFV9MI.mp4",
          "longvideobench/videos/-5VVDwOKRqc.mp4"]
RECIPES = sorted((ROOT / "configs" / "recipes").glob("*.json"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A copy of the fixture tree with a tiny 2 s mp4 (56 px, 8 frames at 4 fps) at every video path."""
    from sparrow_jax.synthetic.video import random_scene, render_frames, write_video

    root = tmp_path_factory.mktemp("datasets")
    shutil.copytree(FIXTURES, root, dirs_exist_ok=True)
    clip = write_video(root / "clip.mp4", render_frames(random_scene(np.random.default_rng(0)), num_frames=8, fps=4,
                                                        height=56, width=56), fps=4)
    for v in VIDEOS:
        (root / v).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(clip, root / v)
    return root


def qwen_cfg():
    """The tests' tiny Qwen2.5-VL with the shipped tokenizer's vocabulary and vision token ids."""
    return our_config(hf_config_dict(text={"vocab_size": 1024}, image_token_id=1021, video_token_id=1022,
                                     vision_start_token_id=1019, vision_end_token_id=1020))


def llava_cfg():
    text = dict(model_type="qwen2", vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rope_theta=10000.0)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=16, patch_size=4, vision_use_head=False)
    d = dict(model_type="llava_onevision", text_config=text, vision_config=vision, image_token_index=1021,
             video_token_index=1022, vision_feature_select_strategy="full", vision_feature_layer=-1,
             vision_aspect_ratio="anyres_max_1", image_grid_pinpoints=[[16, 16], [16, 32], [32, 16]])
    return registry.config_from_dict(d, "tiny llava config")


def broken(tmp_path, name, records, *, jsonl=False):
    """An annotation file with one record per line (list files: record i on line i + 2)."""
    p = tmp_path / name
    lines = [json.dumps(r) for r in records]
    p.write_text("\n".join(lines) + "\n" if jsonl else "[\n" + ",\n".join(lines) + "\n]\n")
    return p


# ------------------------------------------------------------------------------------- reading


def test_record_lines_are_where_each_record_starts(data):
    """Pretty-printed list files: the line given for record i is the line of its opening brace."""
    for rel, indent in ((LLAVA_JSON, "    {"), ("sharegpt4video/share4video_instruct.json", "  {"),
                        ("longvideobench/lvb_val.json", "    {")):
        lines = (data / rel).read_text().splitlines()
        starts = [n for n, s in enumerate(lines, 1) if s == indent]
        recs = ds.read_records(data / rel)
        assert [line for line, _ in recs] == starts and len(starts) == len(json.loads((data / rel).read_text()))
    recs = ds.read_records(data / "sharegpt4video/sharegpt4video_40k.jsonl")
    assert [line for line, _ in recs] == [1, 2]


def test_llava_video_178k_layout(data):
    recs = ds.load_video_instruct(data / LLAVA_JSON, data / LLAVA_DIR)
    assert [r.id for r in recs] == ["v_Q9qOIQrb2Xg-Scene-001", "7UCHN", "nextqa_4010069381"]
    assert all(r.video.is_file() and str(r.video).startswith(str(data / LLAVA_DIR)) for r in recs)
    assert recs[0].turns[0][0] == "Describe what is happening in the video in detail."  # <image>\n removed
    assert [q for q, _ in recs[1].turns] == ["What colour is the moving object?", "Which way does it move?",
                                             "How many objects are there?"]
    assert recs[1].turns[2][1] == "There are two objects."
    assert recs[2].turns[0][0].startswith("Why does the disc stop?\nA. it hits the wall")
    assert recs[1].where.endswith(f"{LLAVA_JSON}:17: record 1")
    ds.main(["check", "--annotation", str(data / LLAVA_JSON), "--video-root", str(data / LLAVA_DIR)])
    with pytest.raises(SystemExit, match=r"datasets: error: .*video_root .*nowhere: not a directory"):
        ds.main(["check", "--annotation", str(data / LLAVA_JSON), "--video-root", str(data / "nowhere")])


def test_sharegpt4video_layouts(data):
    caps = ds.load_video_instruct(data / "sharegpt4video/sharegpt4video_40k.jsonl", data / "sharegpt4video/videos")
    assert caps[0].turns == ((ds.DETAILED_CAPTION_PROMPT, "The video shows a red square on a dark background sliding "
                              "steadily from the right edge to the centre of the frame."),)
    assert caps[1].video.name == "pexels-blue-disc-7.mp4"  # a bare video_id found by its suffix
    conv = ds.load_video_instruct(data / "sharegpt4video/share4video_instruct.json", data / "sharegpt4video",
                                  caption_prompt="unused")
    assert conv[0].turns == (("Summarise the clip in one sentence.", "A red square slides to the centre."),)
    assert conv[1].turns[0][0] == "Is anything moving?"  # no placeholder: the video still goes first
    both = ds.load_video_instruct([data / "sharegpt4video/sharegpt4video_40k.jsonl",
                                   data / "sharegpt4video/share4video_instruct.json"],
                                  [data / "sharegpt4video/videos", data / "sharegpt4video"])
    assert [r.video for r in both] == [r.video for r in caps + conv]
    with pytest.raises(ds.DatasetError, match=r"2 annotation file\(s\) and 3 video root\(s\)"):
        ds.load_video_instruct([data / LLAVA_JSON] * 2, [data] * 3)


def test_eval_loaders(data):
    vdc = ds.load_video_detail_caption(data / "videodetailcaption/test.jsonl", data / "videodetailcaption/Test_Videos")
    assert [Path(r.video).name for r in vdc] == ["v_p1QGn0IzfW0.mp4", "v_yACg55C3IlM.mp4"]
    assert vdc[0].prompt == "Can you provide a comprehensive description of the video?"
    assert vdc[1].reference.startswith("Two green triangles") and vdc[1].answer_index is None

    mvb = ds.load_mvbench(data / "mvbench", ["Action Sequence", "Object Shuffle"])
    assert [r.answer_index for r in mvb] == [0, 1, 2]
    assert mvb[0].bound == (11.1, 19.6) and mvb[2].bound is None and mvb[2].task == "Object Shuffle"
    assert mvb[1].prompt == ("What happened before the person opened the door?\nA. Put down the bag.\n"
                             "B. Closed the window.\nC. Took the phone.\n" + ds.MCQ_INSTRUCTION)
    assert Path(mvb[2].video) == data / "mvbench/video/perception/videos/video_10155.mp4"
    with pytest.raises(ValueError, match=r"json/action_prediction\.json: not found \(MVBench task 'Action Prediction'"):
        ds.load_mvbench(data / "mvbench")  # every video task by default: the fixture holds two
    with pytest.raises(ValueError, match="Episodic Reasoning.*frame directories"):
        ds.load_mvbench(data / "mvbench", ["Episodic Reasoning"])

    lvb = ds.load_longvideobench(data / "longvideobench/lvb_val.json", data / "longvideobench/videos")
    assert [r.answer_index for r in lvb] == [1, 2] and lvb[1].task == "S2A" and lvb[0].duration == 2.0
    assert lvb[1].prompt.startswith("Question: What colour is the disc") and "\nC. blue\n" in lvb[1].prompt


# ------------------------------------------------------------------------------------- samples


def _assistant_spans(sample):
    """The response's maximal runs of loss-target tokens, and of context tokens."""
    resp = np.asarray(sample.response)
    mask = np.ones(len(resp), bool) if sample.response_mask is None else np.asarray(sample.response_mask)
    cuts = np.flatnonzero(np.diff(mask.astype(int))) + 1
    return [(bool(m[0]), r.tolist()) for r, m in zip(np.split(resp, cuts), np.split(mask, cuts))]


def test_qwen_samples_train_on_the_assistant_turns(data):
    cfg = qwen_cfg()
    codec = load_codec(SHIPPED_DIR, 1024)
    src = sample_source("video_instruct")
    items = src(cfg, 5, seed=3, annotation=str(data / LLAVA_JSON), video_root=str(data / LLAVA_DIR),
                tokenizer_dir=str(SHIPPED_DIR))
    assert len(items) == 5 and len(items[0:2]) == 2  # a lazy sequence; slices for extract_features
    multi = next(i for i in range(len(items)) if items.record(i).id == "7UCHN")
    sample = items[multi]
    p = sample.prompt
    assert len(p.visuals) == 1 and int((p.mm_token_type_ids == 2).sum()) == p.visuals[0].num_tokens > 0
    assert p.input_ids[-len(codec.encode(QWEN_ASSISTANT_PREFIX)):].tolist() == codec.encode(QWEN_ASSISTANT_PREFIX)
    turns = items.record(multi).turns
    im_end = codec.encode("<|im_end|>")
    want = [(True, codec.encode(turns[0][1]) + im_end)]
    for q, a in turns[1:]:
        want += [(False, codec.encode(ds.FOLLOW_UP_PREFIX + q + QWEN_ASSISTANT_PREFIX)),
                 (True, codec.encode(a) + im_end)]
    assert _assistant_spans(sample) == want
    seq, assistant = sample_sequence(sample)  # what feature extraction / online training read
    assert codec.decode(seq.input_ids[assistant]) == "".join(a for _, a in turns)

    # max_text_tokens: later turns dropped, text positions within the budget, answers still targets
    budget = int((p.mm_token_type_ids == 0).sum()) + len(want[0][1]) + 3
    cut = src(cfg, 5, seed=3, annotation=str(data / LLAVA_JSON), video_root=str(data / LLAVA_DIR),
              tokenizer_dir=str(SHIPPED_DIR), max_text_tokens=budget)[multi]
    assert _assistant_spans(cut) == want[:1] and cut.response_mask is None

    # the samples go through the trainer's online batch builder (padded slots of the Sparrow view)
    from sparrow_jax.training.data import SlotSpec
    from sparrow_jax.training.features import online_batch

    ob = online_batch(items[0:2], cfg, L=128, M=64, slots=SlotSpec("ivsb_mid"))
    assert ob.train.pred_BL.sum() > 0


def test_text_only_share_and_llava_samples(data):
    kw = dict(annotation=str(data / "sharegpt4video/share4video_instruct.json"),
              video_root=str(data / "sharegpt4video"),
              tokenizer_dir=str(SHIPPED_DIR))
    text_only = ds.video_instruct_source(qwen_cfg(), 2, text_only_share=1.0, **kw)
    assert all(not s.prompt.visuals and not s.prompt.mm_token_type_ids.any() for s in text_only)

    cfg = llava_cfg()
    with pytest.raises(ValueError, match="apply to Qwen2.5-VL targets"):
        ds.video_instruct_source(cfg, 2, fps=1.0, **kw)
    items = ds.video_instruct_source(cfg, 2, num_frames=3, **kw)
    s = items[0]
    codec = load_codec(SHIPPED_DIR, 1024)
    ids, types = s.prompt.input_ids, s.prompt.mm_token_type_ids
    n_vis = 3 * (16 // 4 // 2) ** 2 + 1  # frames x pooled grid + one newline token
    assert int((types == 2).sum()) == n_vis and (ids[types == 2] == cfg.video_token_id).all()
    after = ids[np.flatnonzero(types == 2)[-1] + 1:].tolist()
    q = items.record(0).turns[0][0]
    assert after == codec.encode("\n" + q + QWEN_ASSISTANT_PREFIX)  # decode.py's LLaVA layout
    assert list(s.response) == codec.encode(items.record(0).turns[0][1]) + codec.encode("<|im_end|>")


# -------------------------------------------------------------------------------------- errors


def test_bad_records_name_file_line_and_record(data, tmp_path):
    good = json.loads((data / LLAVA_JSON).read_text())
    root = data / LLAVA_DIR
    missing = [good[0], {k: v for k, v in good[1].items() if k != "conversations"}]
    with pytest.raises(ds.DatasetError, match=r"missing\.json:3: record 1: neither 'conversations'"):
        ds.load_video_instruct(broken(tmp_path, "missing.json", missing), root)
    no_value = [good[0], {**good[1], "conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]}]
    with pytest.raises(ds.DatasetError, match=r"novalue\.json:3: record 1: conversations\[0\]: missing field 'value'"):
        ds.load_video_instruct(broken(tmp_path, "novalue.json", no_value), root)
    wrong_type = [{**good[0], "video": 17}]
    with pytest.raises(ds.DatasetError, match=r"type\.json:2: record 0: field 'video' should be a non-empty string, "
                                              r"got int 17"):
        ds.load_video_instruct(broken(tmp_path, "type.json", wrong_type), root)
    order = [{**good[0], "conversations": good[0]["conversations"][::-1]}]
    with pytest.raises(ds.DatasetError, match=r"order\.json:2: record 0: conversations\[0\]: 'from' is 'gpt'"):
        ds.load_video_instruct(broken(tmp_path, "order.json", order), root)
    gone = [good[0], good[1], {**good[2], "video": "academic_source/NextQA/1164/missing.mp4"}]
    with pytest.raises(ds.DatasetError, match=r"gone\.json:4: record 2: video file not found: .*/1164/missing\.mp4"):
        ds.load_video_instruct(broken(tmp_path, "gone.json", gone), root)

    # malformed JSON: list files and JSONL, with line and column
    bad = tmp_path / "bad.json"
    bad.write_text('[\n{"video": "a.mp4", "conversations": []},\n{"video": "b.mp4" "conversations": []}\n]\n')
    with pytest.raises(ds.DatasetError, match=r"bad\.json:3:\d+: record 1: malformed JSON \(Expecting ','"):
        ds.read_records(bad)
    bad.write_text('[\n{"a": 1}\n{"a": 2}\n]\n')
    with pytest.raises(ds.DatasetError, match=r"bad\.json:3:1: malformed JSON \(expected ',' or '\]' after record 0"):
        ds.read_records(bad)
    bad.write_text('{"a": 1}\n')
    with pytest.raises(ds.DatasetError, match=r"bad\.json:1:1: malformed JSON \(expected a JSON list of records"):
        ds.read_records(bad)
    bad_l = tmp_path / "bad.jsonl"
    bad_l.write_text('{"video_name": "a", "question": "q", "answer": "a"}\n\n{"video_name": "b", "question": \n')
    with pytest.raises(ds.DatasetError, match=r"bad\.jsonl:3:\d+: record 1: malformed JSON"):
        ds.read_records(bad_l)
    bad_l.write_text('{"video_name": "a"}\n[1, 2]\n')
    with pytest.raises(ds.DatasetError, match=r"bad\.jsonl:2: record 1: expected a JSON object, got list"):
        ds.read_records(bad_l)


def test_bad_benchmark_records(data, tmp_path):
    vdc = [{"video_name": "v_p1QGn0IzfW0", "question": "q?", "answer": "a."}, {"video_name": "v_p1QGn0IzfW0",
                                                                                "question": "q?"}]
    with pytest.raises(ds.DatasetError, match=r"vdc\.jsonl:2: record 1: missing field 'answer'"):
        ds.load_video_detail_caption(broken(tmp_path, "vdc.jsonl", vdc, jsonl=True),
                                     data / "videodetailcaption/Test_Videos")
    vdc = [{"video_name": "v_nothere", "question": "q?", "answer": "a."}]
    with pytest.raises(ds.DatasetError, match=r"vdc2\.jsonl:1: record 0: video file not found: .*v_nothere\{\.mp4,"):
        ds.load_video_detail_caption(broken(tmp_path, "vdc2.jsonl", vdc, jsonl=True),
                                     data / "videodetailcaption/Test_Videos")

    mv = tmp_path / "mvbench"
    shutil.copytree(data / "mvbench", mv)
    recs = json.loads((mv / "json/object_shuffle.json").read_text())
    broken(mv / "json", "object_shuffle.json", recs + [{**recs[0], "answer": "Under the table."}])
    with pytest.raises(ds.DatasetError, match=r"object_shuffle\.json:3: record 1: answer 'Under the table\.' is not "
                                              "one of the candidates"):
        ds.load_mvbench(mv, ["Object Shuffle"])
    broken(mv / "json", "object_shuffle.json", [{**recs[0], "candidates": "A or B"}])
    with pytest.raises(ds.DatasetError, match=r"object_shuffle\.json:2: record 0: field 'candidates' should be a "
                                              r"non-empty list of non-empty strings, got str"):
        ds.load_mvbench(mv, ["Object Shuffle"])

    lvb = json.loads((data / "longvideobench/lvb_val.json").read_text())
    for change, msg in (({"correct_choice": 7}, r"correct_choice 7 is outside the 4 candidates"),
                        ({"correct_choice": "C"}, r"field 'correct_choice' should be an integer, got str"),
                        ({"video_path": "nope.mp4"}, r"video file not found: .*videos/nope\.mp4")):
        with pytest.raises(ds.DatasetError, match=r"lvb\.json:3: record 1: " + msg):
            ds.load_longvideobench(broken(tmp_path, "lvb.json", [lvb[0], {**lvb[1], **change}]),
                                   data / "longvideobench/videos")


def test_parse_choice():
    assert [ds.parse_choice(t, 4) for t in ("B", "(C) a cat", "D. something", "The answer is A.", "Answer: B",
                                            "I think it is c", "E", "")] == [1, 2, 3, 0, 1, None, None, None]


# -------------------------------------------------------------------------------- recipes, eval loop


def test_recipes_load_as_train_configs():
    assert {p.name for p in RECIPES} >= {"qwen2_5_vl_7b_sparrow.json", "qwen2_5_vl_7b_msd.json",
                                         "llava_ov_7b_sparrow.json"}
    params = inspect.signature(ds.video_instruct_source).parameters
    for p in RECIPES:
        cfg = TrainConfig.from_file_and_overrides(str(p), [])
        assert sample_source(cfg.data) is ds.video_instruct_source, p.name
        unknown = set(cfg.data_options) - set(params)
        assert not unknown, f"{p.name}: data_options {unknown} are not video_instruct_source arguments"
        assert cfg.data_options.get("max_visual_tokens") == cfg.max_visual, p.name
        assert cfg.data_options.get("max_text_tokens") == cfg.max_text, p.name


def test_manifest_script_and_score(data, tmp_path):
    """manifest -> run.sh (prompts with newlines and quotes survive the shell) -> decode lines -> score;
    a second run.sh skips the rows already there."""
    fake = tmp_path / "fake_decode.py"
    fake.write_text(
        "import argparse, json\nap = argparse.ArgumentParser()\nap.add_argument('--prompt', action='append')\n"
        "ap.add_argument('--video', action='append')\nap.add_argument('--jsonl')\n"
        "a, _ = ap.parse_known_args()\nwith open(a.jsonl, 'a') as f:\n"
        "    for p, v in zip(a.prompt, a.video):\n"
        "        assert open(v, 'rb').read(8)\n"
        "        f.write(json.dumps({'prompt': p, 'text': 'B' if 'door' in p else 'A', 'tau': 2.0}) + '\\n')\n")
    recs = ds.eval_records("mvbench", root=data / "mvbench", tasks=["Action Sequence", "Object Shuffle"])
    out = ds.write_eval_dir(recs, tmp_path / "eval", batch=2, decode=str(fake))
    (out / "run.sh").write_text((out / "run.sh").read_text().replace(f"python {fake}", f"{sys.executable} {fake}"))
    for _ in range(2):
        subprocess.run(["bash", str(out / "run.sh"), "--target", "ignored"], check=True, capture_output=True)
    assert len((out / "decode.jsonl").read_text().splitlines()) == 3
    ds.main(["score", "--dir", str(out)])
    preds = [r for _, r in ds.read_records(out / "decode.jsonl")]
    got = ds.score(recs, preds)
    assert got["accuracy_per_task"] == {"Action Sequence": 1.0, "Object Shuffle": 0.0} and got["mean_tau"] == 2.0
    with pytest.raises(ds.DatasetError, match="decode lines for 3 records"):
        ds.score(recs, preds[:2])
    with pytest.raises(ds.DatasetError, match=r"predictions:2: prompt differs from record 1"):
        ds.score(recs, [preds[0], preds[2], preds[1]])

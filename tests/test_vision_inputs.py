"""Tests for sparrow_jax.io.vision_inputs: HF parity, frame sampling, PyAV decoding, bad inputs, prompts."""

from __future__ import annotations

import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import av
import numpy as np
import PIL.Image
import pytest

from sparrow_jax.io.vision_inputs import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    VisionInputError,
    VisionPreprocessConfig,
    VisionTokenIds,
    VisualInput,
    build_multimodal_prompt,
    fit_video_budget,
    frame_size,
    patchify,
    preprocess_frames,
    preprocess_image,
    preprocess_video,
    read_video,
    sample_frame_indices,
    smart_resize,
    visual_tokens,
)

P, TP, C = 14, 2, 3
ROW = C * TP * P * P  # 1176


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_pil():
    """HF reference: the PIL-backend Qwen2-VL image processor (torchvision is unavailable here)."""
    mod = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")

    def run(image, min_pixels=56 * 56, max_pixels=28 * 28 * 1280):
        proc = mod.Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
        out = proc(images=[image], return_tensors="np")
        return np.asarray(out["pixel_values"]), tuple(int(v) for v in out["image_grid_thw"][0])

    run.module = mod
    return run


def frame_colour(i: int) -> tuple[int, int, int]:
    """Distinct, well-separated solid colour for frame i (away from 0/255 clipping)."""
    return ((37 * i) % 200 + 28, (91 * i + 60) % 200 + 28, (53 * i + 120) % 200 + 28)


def write_video(path, codec, num_frames, fps=10, height=64, width=96, noise=False, options=None):
    """Write a small video with PyAV: solid frame_colour(i) frames (or random noise)."""
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if options:
            stream.options = options
        for i in range(num_frames):
            if noise:
                rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            else:
                rgb = np.empty((height, width, 3), np.uint8)
                rgb[...] = frame_colour(i)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def assert_one_line_error(excinfo, name: str):
    msg = str(excinfo.value)
    assert isinstance(excinfo.value, VisionInputError)
    assert name in msg, msg
    assert "\n" not in msg and "\r" not in msg, msg


# ----------------------------------------------------------------------------------------------
# smart_resize / config
# ----------------------------------------------------------------------------------------------


def test_smart_resize_matches_hf(hf_pil):
    rng = np.random.default_rng(1)
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(1, 4000, size=2))
        if max(h, w) / min(h, w) > 200:
            continue
        mn = int(rng.choice([56 * 56, 128 * 28 * 28]))
        mx = int(rng.choice([28 * 28 * 1280, 28 * 28 * 768, 12845056]))
        assert smart_resize(h, w, 28, mn, mx) == hf_pil.module.smart_resize(h, w, 28, mn, mx)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2050)


def test_config_defaults_and_json(tmp_path):
    img = VisionPreprocessConfig()
    assert (img.min_pixels, img.max_pixels, img.factor) == (56 * 56, 28 * 28 * 1280, 28)
    assert img.image_mean == OPENAI_CLIP_MEAN and img.image_std == OPENAI_CLIP_STD
    vid = VisionPreprocessConfig.for_video()
    assert (vid.min_pixels, vid.max_pixels, vid.min_frames, vid.max_frames, vid.fps) == (
        128 * 28 * 28, 28 * 28 * 768, 4, 768, 2.0)
    # The Qwen2.5-VL-7B-Instruct preprocessor_config.json.
    cfg_json = {
        "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
        "merge_size": 2, "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD),
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg_json))
    cfg = VisionPreprocessConfig.from_hf_preprocessor_json(tmp_path / "preprocessor_config.json")
    assert cfg.max_pixels == 12845056 and cfg.min_pixels == 3136 and cfg.image_mean == OPENAI_CLIP_MEAN
    vjson = {"video_processor_type": "Qwen2VLVideoProcessor", "size": {"shortest_edge": 1000, "longest_edge": 9000},
             "fps": 1.0, "max_frames": 32}
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(vjson))
    vcfg = VisionPreprocessConfig.from_hf_preprocessor_json(tmp_path / "video_preprocessor_config.json")
    assert (vcfg.min_pixels, vcfg.max_pixels, vcfg.fps, vcfg.max_frames, vcfg.min_frames) == (1000, 9000, 1.0, 32, 4)


# ----------------------------------------------------------------------------------------------
# image parity with HF Qwen2VLImageProcessorPil
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "height,width,min_pixels,max_pixels,expect",
    [
        (224, 224, 56 * 56, 28 * 28 * 1280, "exact"),
        (50, 70, 56 * 56, 28 * 28 * 1280, "round"),
        (33, 97, 56 * 56, 28 * 28 * 1280, "round"),
        (9, 13, 56 * 56, 28 * 28 * 1280, "min"),  # rounds to 0x28 < min_pixels -> upscaled
        (1000, 1500, 56 * 56, 28 * 28 * 1280, "max"),  # 1.5 Mpx > max_pixels -> downscaled
        (300, 170, 56 * 56, 28 * 28 * 16, "max"),
    ],
)
def test_image_matches_hf(hf_pil, height, width, min_pixels, max_pixels, expect):
    rng = np.random.default_rng(height * 7 + width)
    arr = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    cfg = VisionPreprocessConfig(min_pixels=min_pixels, max_pixels=max_pixels)
    ours = preprocess_image(arr, cfg)
    ref_pixels, ref_grid = hf_pil(PIL.Image.fromarray(arr), min_pixels, max_pixels)
    assert ours.kind == "image" and ours.grid_thw == ref_grid
    assert ours.pixel_values.dtype == np.float32 and ours.pixel_values.shape == ref_pixels.shape
    np.testing.assert_allclose(ours.pixel_values, ref_pixels, rtol=0, atol=1e-5)
    t, gh, gw = ours.grid_thw
    area = gh * gw * P * P
    assert t == 1 and ours.num_tokens == gh * gw // 4
    if expect == "min":
        assert area >= min_pixels and round(height / 28) * round(width / 28) * 784 < min_pixels
    if expect == "max":
        assert area <= max_pixels < height * width


def test_image_modes_and_paths_match_hf(hf_pil, tmp_path):
    """RGBA / grayscale PIL inputs and file paths follow HF's convert_to_rgb / load_image."""
    from transformers.image_utils import load_image

    rng = np.random.default_rng(5)
    rgba = PIL.Image.fromarray(rng.integers(0, 256, (45, 61, 4), dtype=np.uint8), mode="RGBA")
    gray = PIL.Image.fromarray(rng.integers(0, 256, (80, 40), dtype=np.uint8), mode="L")
    for image in (rgba, gray):
        ref_pixels, ref_grid = hf_pil(image)
        ours = preprocess_image(image)
        assert ours.grid_thw == ref_grid
        np.testing.assert_allclose(ours.pixel_values, ref_pixels, rtol=0, atol=1e-5)
    path = tmp_path / "photo.png"
    rgba.save(path)
    ref_pixels, ref_grid = hf_pil(load_image(str(path)))
    ours = preprocess_image(path)
    assert ours.grid_thw == ref_grid
    np.testing.assert_allclose(ours.pixel_values, ref_pixels, rtol=0, atol=1e-5)
    # uint8 RGBA array: HF numpy convert_to_rgb blends onto white.
    arr4 = np.asarray(rgba)
    ref_pixels, _ = hf_pil(arr4)
    np.testing.assert_allclose(preprocess_image(arr4).pixel_values, ref_pixels, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# video parity: per-frame equality with the HF image processor
# ----------------------------------------------------------------------------------------------


def test_video_frames_match_hf_image_processor_per_frame(hf_pil):
    """Our video path applies HF's PIL image pipeline to every frame (HF's own video processor uses
    torchvision resizing, which is not bit-comparable). So each temporal slot of our video patches
    must equal slot 0 of the HF image processor's patches for that frame; frame 5 (odd count) is the
    padding repeat of frame 4."""
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (5, 61, 83, 3), dtype=np.uint8)
    cfg = VisionPreprocessConfig.for_video(min_pixels=56 * 56, max_pixels=28 * 28 * 40)
    vis = preprocess_frames(frames, cfg, second_per_grid_t=0.5)
    t, gh, gw = vis.grid_thw
    assert vis.kind == "video" and t == 3 and vis.second_per_grid_t == 0.5
    ours = vis.pixel_values.reshape(t, gh * gw, C, TP, P, P)
    for i in range(6):
        ref_pixels, ref_grid = hf_pil(PIL.Image.fromarray(frames[min(i, 4)]), cfg.min_pixels, cfg.max_pixels)
        assert ref_grid == (1, gh, gw)
        ref = ref_pixels.reshape(gh * gw, C, TP, P, P)[:, :, 0]
        np.testing.assert_allclose(ours[i // TP, :, :, i % TP], ref, rtol=0, atol=1e-5)


def test_video_identical_pairs_equal_hf_image_rows(hf_pil):
    """A temporal group made of two identical frames is exactly an HF image (frame repeated)."""
    rng = np.random.default_rng(4)
    a, b = rng.integers(0, 256, (2, 40, 90, 3), dtype=np.uint8)
    frames = np.stack([a, a, b, b])
    vis = preprocess_frames(frames, VisionPreprocessConfig())
    rows = vis.grid_thw[1] * vis.grid_thw[2]
    for g, img in enumerate((a, b)):
        ref_pixels, ref_grid = hf_pil(PIL.Image.fromarray(img))
        assert ref_grid == (1, *vis.grid_thw[1:])
        np.testing.assert_allclose(vis.pixel_values[g * rows:(g + 1) * rows], ref_pixels, rtol=0, atol=1e-5)


def test_patchify_matches_hf_video_patchify_reference():
    """Compare with a transcription of HF ``Qwen2VLVideoProcessor.patchify`` (torch view/permute)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    frames_THWC = rng.standard_normal((3, 56, 84, 3)).astype(np.float32)
    ours, grid = patchify(frames_THWC, VisionPreprocessConfig())

    videos = torch.from_numpy(frames_THWC).permute(0, 3, 1, 2)[None]  # B, T, C, H, W
    b, t, c, h, w = videos.shape
    if pad := -t % TP:
        videos = torch.cat((videos, videos[:, -1:].expand(-1, pad, -1, -1, -1)), dim=1)
        t += pad
    gt, gh, gw, m = t // TP, h // P, w // P, 2
    ref = videos.reshape(b, gt, TP, c, gh // m, m, P, gw // m, m, P).permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    ref = ref.reshape(b, gt * gh * gw, c * TP * P * P)[0].numpy()
    assert grid == (gt, gh, gw) == (2, 4, 6)
    np.testing.assert_array_equal(ours, ref)


# ----------------------------------------------------------------------------------------------
# frame sampling
# ----------------------------------------------------------------------------------------------


def hf_rule_num_frames(total, video_fps, cfg):
    tp = cfg.temporal_patch_size
    max_frames = math.floor(min(cfg.max_frames, total) / tp) * tp
    n = min(max(total / video_fps * cfg.fps, cfg.min_frames), max_frames, total)
    return math.floor(n / tp) * tp


@pytest.mark.parametrize(
    "total,video_fps,cfg_kwargs,expected",
    [
        (30, 10.0, {}, [0, 5, 10, 15, 20, 25]),  # 3 s at 2 fps
        (7, 25.0, {}, [0, 1, 3, 5]),  # very short: min_frames=4
        (3, 30.0, {}, [0, 1]),  # shorter than min_frames: capped at floor(3/2)*2
        (1, 30.0, {}, [0, 0]),  # shorter than temporal_patch_size: last frame repeated
        (100, 10.0, {"max_frames": 7}, [0, 16, 33, 50, 66, 83]),  # max_frames rounded down to 6
        (5, 10.0, {"fps": None}, [0, 1, 2, 3, 4]),  # no sampling
        (17, 17 * 2 / 14.5, {}, [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15]),  # HF yields a 15th index == 17
    ],
)
def test_sample_frame_indices_cases(total, video_fps, cfg_kwargs, expected):
    idx = sample_frame_indices(total, video_fps, VisionPreprocessConfig(**cfg_kwargs))
    assert idx.tolist() == expected
    assert np.issubdtype(idx.dtype, np.integer)


def test_sample_frame_indices_follow_hf_rule():
    torch = pytest.importorskip("torch")
    cfg = VisionPreprocessConfig()
    cases = [(t, f) for t in (2, 4, 9, 17, 30, 31, 100, 241, 999, 1800, 7201, 100000)
             for f in (1.0, 8.0, 23.976, 25.0, 29.97, 60.0)]
    for total, video_fps in cases:
        idx = sample_frame_indices(total, video_fps, cfg)
        n = hf_rule_num_frames(total, video_fps, cfg)
        assert len(idx) == n and n % 2 == 0 and 2 <= n <= 768
        ref = torch.arange(0, total, total / n).int().numpy()  # HF's exact expression
        np.testing.assert_array_equal(idx, ref[:n])
        assert (ref[n:] == total).all()  # any extra HF value is the out-of-range float round-off
        assert idx.min() >= 0 and idx.max() < total and (np.diff(idx) > 0).all()
    assert len(sample_frame_indices(100000, 30.0, cfg)) == 768  # max_frames clipping


# ----------------------------------------------------------------------------------------------
# decoding real files
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,codec,options",
    [
        ("clip.mp4", "libx264", {"crf": "10"}),
        ("clip_mpeg4.mp4", "mpeg4", {"qscale": "2"}),
        ("clip.webm", "libvpx-vp9", {"crf": "10", "b": "0"}),
        ("clip.mkv", "mpeg4", {"qscale": "2"}),
    ],
)
def test_read_video_decodes_sampled_frames(tmp_path, name, codec, options):
    path = write_video(tmp_path / name, codec, num_frames=30, fps=10, options=options)
    video = read_video(path, VisionPreprocessConfig.for_video())
    assert video.total_frames == 30 and video.video_fps == pytest.approx(10.0)
    assert video.frame_indices.tolist() == [0, 5, 10, 15, 20, 25]
    assert video.frames.shape == (6, 64, 96, 3) and video.frames.dtype == np.uint8
    assert video.duration_s == pytest.approx(3.0)
    assert video.sampled_fps == pytest.approx(2.0) and video.second_per_grid_t == pytest.approx(1.0)
    palette = np.array([frame_colour(i) for i in range(30)], dtype=np.float64)
    for frame, idx in zip(video.frames, video.frame_indices):
        mean = frame.reshape(-1, 3).mean(0)
        assert np.abs(mean - palette[idx]).max() < 8, (idx, mean, palette[idx])
        assert int(np.argmin(np.abs(palette - mean).sum(1))) == idx


def test_preprocess_video_end_to_end(tmp_path):
    path = write_video(tmp_path / "e2e.mp4", "libx264", num_frames=12, fps=8, height=56, width=84)
    cfg = VisionPreprocessConfig.for_video(min_pixels=56 * 56)
    vis = preprocess_video(path, cfg)
    video = read_video(path, cfg)
    # 12 frames @ 8 fps -> 1.5 s * 2 fps = 3 -> min_frames 4 -> [0, 3, 6, 9]
    assert video.frame_indices.tolist() == [0, 3, 6, 9]
    assert vis.kind == "video" and vis.grid_thw == (2, 4, 6) and vis.num_tokens == 12
    assert vis.second_per_grid_t == pytest.approx(2 / (4 / 12 * 8))
    np.testing.assert_array_equal(vis.pixel_values, preprocess_frames(video.frames, cfg).pixel_values)


def test_short_and_fractional_fps_videos(tmp_path):
    one = read_video(write_video(tmp_path / "one.mp4", "libx264", num_frames=1), VisionPreprocessConfig())
    assert one.total_frames == 1 and one.frame_indices.tolist() == [0, 0] and one.frames.shape[0] == 2
    np.testing.assert_array_equal(one.frames[0], one.frames[1])
    assert preprocess_frames(one.frames, VisionPreprocessConfig()).grid_thw[0] == 1
    short = read_video(write_video(tmp_path / "short.mkv", "mpeg4", num_frames=7, fps=25), VisionPreprocessConfig())
    assert short.total_frames == 7 and short.frame_indices.tolist() == [0, 1, 3, 5]
    assert short.second_per_grid_t == pytest.approx(2 / (4 / 7 * 25))


# ----------------------------------------------------------------------------------------------
# variable frame rate: sampling by presentation time
# ----------------------------------------------------------------------------------------------

# 10 frames 0.1 s apart, then 10 frames 1 s apart: 20 frames over 11 s (the last shown for 1 s).
VFR_TIMES = [i * 0.1 for i in range(10)] + [1.0 + i for i in range(10)]


def write_vfr_video(path, times=VFR_TIMES, height=64, width=96):
    """A variable-frame-rate H.264 mp4 (PyAV, millisecond pts), frame i in solid frame_colour(i)."""
    from fractions import Fraction

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        for i, t in enumerate(times):
            rgb = np.empty((height, width, 3), np.uint8)
            rgb[...] = frame_colour(i)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = round(t * 1000), Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_vfr_video_is_sampled_by_presentation_time(tmp_path):
    path = write_vfr_video(tmp_path / "vfr.mp4")
    cfg = VisionPreprocessConfig.for_video(min_pixels=56 * 56, max_pixels=56 * 84)
    video = read_video(path, cfg)
    assert not video.constant_rate and video.total_frames == 20
    assert video.duration_s == pytest.approx(11.0)  # last pts 10 s + its 1 s interval, not 20 / avg_rate
    # 11 s at 2 fps = 22 frames, clamped to the 20 decoded frames; instants k * 11 / 20 s
    n = len(video.frame_indices)
    assert n == 20
    instants = np.arange(n) * 11.0 / n
    expected = [max(i for i, t in enumerate(VFR_TIMES) if t <= s + 1e-9) for s in instants]
    assert video.frame_indices.tolist() == expected
    np.testing.assert_allclose(video.frame_times_s, np.asarray(VFR_TIMES)[expected], atol=1e-3)
    # the pixels are those frames (identified by colour)
    palette = np.array([frame_colour(i) for i in range(20)], dtype=np.float64)
    for frame, idx in zip(video.frames, video.frame_indices):
        assert int(np.argmin(np.abs(palette - frame.reshape(-1, 3).mean(0)).sum(1))) == idx
    # the temporal spacing comes from the timestamps: 2 frames per grid step, 11 s / 20 frames apart
    assert video.sampled_fps == pytest.approx(20 / 11.0)
    assert video.second_per_grid_t == pytest.approx(2 * 11.0 / 20)
    vis = preprocess_video(path, cfg)
    assert vis.second_per_grid_t == pytest.approx(2 * 11.0 / 20) and "presentation time" in vis.summary
    # the old index rule would have spread samples evenly over frames: 10 of 20 in the first second
    assert (np.asarray(VFR_TIMES)[sample_frame_indices(20, 20 / 11.0, cfg)] < 1.0).sum() == 10
    assert (video.frame_times_s < 1.0).sum() == 2


def test_vfr_temporal_positions_follow_the_timestamps(tmp_path):
    """M-RoPE temporal positions of a VFR video step by tokens_per_second * second_per_grid_t, as
    transformers computes them for the given fps."""
    import _tiny
    from sparrow_jax.models.qwen2_5_vl import rope_index

    cfg = VisionPreprocessConfig.for_video(min_pixels=56 * 56, max_pixels=56 * 56)
    vis = preprocess_video(write_vfr_video(tmp_path / "vfr.mp4"), cfg)
    prompt = build_multimodal_prompt([[1, 2], vis, [3]], VisionTokenIds(_tiny.VSTART, _tiny.VEND, _tiny.IMAGE,
                                                                          _tiny.VIDEO))
    mcfg = _tiny.our_config()
    pos, _ = rope_index(prompt.input_ids, prompt.mm_token_type_ids, [vis.grid_thw], [vis.second_per_grid_t], mcfg)
    t_pos = pos[0][prompt.mm_token_type_ids == 2].reshape(vis.grid_thw[0], -1)[:, 0] - pos[0][3]
    step = np.float32(mcfg.vision.tokens_per_second) * np.float32(2 * 11.0 / 20)
    assert t_pos.tolist() == (np.arange(vis.grid_thw[0], dtype=np.float32) * step).astype(np.int64).tolist()


# ----------------------------------------------------------------------------------------------
# visual-token budget and preprocessing from the model
# ----------------------------------------------------------------------------------------------


def test_frame_size_follows_qwen_vl_utils_total_pixel_rule():
    """qwen-vl-utils fetch_video: max_pixels = max(min(VIDEO_MAX_PIXELS, total_pixels / nframes * 2),
    int(min_pixels * 1.05)), total_pixels = 0.9 x context x 28^2 (here: cap_pixels_per_frame, as HF)."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = int(rng.integers(40, 2000)), int(rng.integers(40, 2000))
        n, ctx = int(rng.integers(1, 400)) * 2, int(rng.choice([4096, 32768, 128000]))
        cfg = VisionPreprocessConfig.for_video(cap_pixels_per_frame=True, max_video_tokens=ctx)
        total = int(ctx * 28 * 28 * 0.9)
        cap = max(min(28 * 28 * 768, total * 2 // n), int(128 * 28 * 28 * 1.05))
        assert frame_size(h, w, n, cfg) == smart_resize(h, w, 28, 128 * 28 * 28, cap)
        # the same budget stated as visual tokens gives the same frames
        same = VisionPreprocessConfig.for_video(max_visual_tokens=int(ctx * 0.9))
        assert abs(same.video_pixel_budget - total) < 28 * 28
        assert frame_size(h, w, n, same) == smart_resize(h, w, 28, 128 * 28 * 28,
                                                         max(min(28 * 28 * 768, same.video_pixel_budget * 2 // n),
                                                             int(128 * 28 * 28 * 1.05)))


@pytest.mark.parametrize("budget", [50, 400, 3000, 20000, 60000])
def test_budget_shrinks_frames_then_frame_count(budget):
    """A 10-minute 240x136 video at 2 fps (768 frames): within the budget, frames shrink to the pixel
    floor first, and only then are whole temporal groups dropped."""
    cfg = VisionPreprocessConfig.for_video(max_visual_tokens=budget)
    n, size = fit_video_budget(768, 136, 240, cfg)
    assert visual_tokens(n, size, cfg) <= budget and n % 2 == 0 and n >= 2
    floor = frame_size(136, 240, 768, VisionPreprocessConfig.for_video(max_visual_tokens=1))  # at the floor
    if n < 768:  # frames were dropped only because the floor-sized frames still overflowed
        assert visual_tokens(768, floor, cfg) > budget
        if n > 2:
            assert size == floor or size[0] * size[1] >= floor[0] * floor[1]
            assert visual_tokens(n + 2, frame_size(136, 240, n + 2, cfg), cfg) > budget  # as many as fit
    unbounded = VisionPreprocessConfig.for_video()
    assert visual_tokens(768, frame_size(136, 240, 768, unbounded), unbounded) == 55296  # the figure


def test_budget_cuts_a_real_video_evenly(tmp_path):
    path = write_video(tmp_path / "long.mp4", "libx264", num_frames=60, fps=10, height=56, width=84)
    free = read_video(path, VisionPreprocessConfig.for_video(min_pixels=56 * 84))
    assert len(free.frame_indices) == 12 and visual_tokens(12, free.resized_hw, VisionPreprocessConfig()) == 36
    cfg = VisionPreprocessConfig.for_video(min_pixels=56 * 84, max_visual_tokens=13)
    cut = read_video(path, cfg)
    # 6 groups of 6 tokens at the pixel floor: cut to 2 groups (12 tokens <= 13)
    assert len(cut.frame_indices) == 4 and cut.rule_frames == 12 and cut.resized_hw == free.resized_hw
    assert cut.frame_indices.tolist() == [0, 15, 30, 45]  # still spread over the whole video
    assert cut.second_per_grid_t == pytest.approx(2 * 6.0 / 4)
    vis = preprocess_video(path, cfg)
    assert vis.num_tokens <= 13 and "cut to fit 13 visual tokens" in vis.summary
    image = preprocess_image(np.zeros((560, 840, 3), np.uint8), VisionPreprocessConfig(max_visual_tokens=100))
    assert image.num_tokens <= 100


def test_preprocessing_from_the_model_config_and_json(tmp_path):
    import types

    vision = types.SimpleNamespace(patch_size=8, temporal_patch_size=1, spatial_merge_size=1)
    cfg = VisionPreprocessConfig.for_model(vision, video=True)
    assert (cfg.patch_size, cfg.temporal_patch_size, cfg.merge_size, cfg.factor) == (8, 1, 1, 8)
    assert (cfg.min_pixels, cfg.fps) == (128 * 28 * 28, 2.0)
    js = tmp_path / "video_preprocessor_config.json"
    js.write_text(json.dumps({"video_processor_type": "Qwen2VLVideoProcessor", "fps": 1.0, "max_frames": 16,
                              "size": {"shortest_edge": 4096, "longest_edge": 8192}, "patch_size": 8}))
    cfg = VisionPreprocessConfig.for_model(vision, video=True, preprocessor_json=js, fps=4.0)
    assert (cfg.fps, cfg.max_frames, cfg.min_pixels, cfg.max_pixels, cfg.patch_size) == (4.0, 16, 4096, 8192, 8)
    cfg = VisionPreprocessConfig.for_model(vision, video=True, preprocessor_json=js, max_pixels=1000)
    assert (cfg.min_pixels, cfg.max_pixels) == (1000, 1000)  # a cap under the floor lowers the floor
    js.write_text(json.dumps({"patch_size": 14, "merge_size": 1}))
    with pytest.raises(ValueError, match="video_preprocessor_config.json: patch_size 14 does not match"):
        VisionPreprocessConfig.for_model(vision, video=True, preprocessor_json=js)
    js.write_text("{ not json")
    with pytest.raises(ValueError, match="video_preprocessor_config.json: cannot read"):
        VisionPreprocessConfig.for_model(vision, video=True, preprocessor_json=js)
    js.write_text(json.dumps({"min_pixels": 9000, "max_pixels": 10}))
    with pytest.raises(ValueError, match="video_preprocessor_config.json: min_pixels"):
        VisionPreprocessConfig.for_model(vision, video=True, preprocessor_json=js)


# ----------------------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------------------


def _mp4_bytes(tmp_path) -> bytes:
    path = write_video(tmp_path / "src_noise.mp4", "libx264", num_frames=20, height=64, width=64, noise=True)
    return path.read_bytes()


def _bad_video_files(tmp_path):
    files = {}
    files["missing.mp4"] = tmp_path / "missing.mp4"
    (tmp_path / "empty.mp4").write_bytes(b"")
    files["empty.mp4"] = tmp_path / "empty.mp4"
    (tmp_path / "notes.mp4").write_text("this is plain text, not a video\n" * 20)
    files["notes.mp4"] = tmp_path / "notes.mp4"
    PIL.Image.new("RGB", (32, 24), (10, 200, 30)).save(tmp_path / "still.png")
    files["still.png"] = tmp_path / "still.png"
    (tmp_path / "still_png.mp4").write_bytes((tmp_path / "still.png").read_bytes())
    files["still_png.mp4"] = tmp_path / "still_png.mp4"
    data = _mp4_bytes(tmp_path)
    (tmp_path / "half.mp4").write_bytes(data[: len(data) // 2])
    files["half.mp4"] = tmp_path / "half.mp4"
    q = len(data) // 4
    (tmp_path / "zeroed.mp4").write_bytes(data[:q] + bytes(2 * q) + data[3 * q:])
    files["zeroed.mp4"] = tmp_path / "zeroed.mp4"
    # audio-only container
    with av.open(str(tmp_path / "audio_only.mkv"), "w") as container:
        stream = container.add_stream("libopus", rate=48000)
        for _ in range(5):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 960), np.float32), format="flt", layout="mono")
            frame.sample_rate = 48000
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    files["audio_only.mkv"] = tmp_path / "audio_only.mkv"
    # a video stream that holds zero frames (plus audio so the muxer writes a file)
    with av.open(str(tmp_path / "no_frames.mkv"), "w") as container:
        vstream = container.add_stream("mpeg4", rate=10)
        vstream.width, vstream.height, vstream.pix_fmt = 64, 64, "yuv420p"
        astream = container.add_stream("libopus", rate=48000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 960), np.float32), format="flt", layout="mono")
        frame.sample_rate = 48000
        for packet in [*astream.encode(frame), *astream.encode(), *vstream.encode()]:
            container.mux(packet)
    files["no_frames.mkv"] = tmp_path / "no_frames.mkv"
    (tmp_path / "a_directory.mp4").mkdir()
    files["a_directory.mp4"] = tmp_path / "a_directory.mp4"
    return files


def test_bad_video_inputs_raise_one_line_errors(tmp_path):
    expected_problem = {
        "missing.mp4": "not found",
        "empty.mp4": "empty",
        "notes.mp4": "cannot open",
        "still.png": "not a video",
        "still_png.mp4": "not a video",
        "half.mp4": "",
        "zeroed.mp4": "",
        "audio_only.mkv": "no video stream",
        "no_frames.mkv": "zero decodable frames",
        "a_directory.mp4": "not a regular file",
    }
    files = _bad_video_files(tmp_path)
    assert set(files) == set(expected_problem)
    for name, path in files.items():
        for fn in (read_video, preprocess_video):
            with pytest.raises(VisionInputError) as excinfo:
                fn(path)
            assert_one_line_error(excinfo, name)
            assert expected_problem[name] in str(excinfo.value), str(excinfo.value)
            assert excinfo.value.__cause__ is None  # raw PyAV errors are not chained into tracebacks


def test_bad_image_inputs_raise_one_line_errors(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image\n")
    buf = tmp_path / "full.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf)
    (tmp_path / "truncated.png").write_bytes(buf.read_bytes()[: buf.stat().st_size // 2])
    for name in ("missing.jpg", "empty.jpg", "text.png", "truncated.png"):
        with pytest.raises(VisionInputError) as excinfo:
            preprocess_image(tmp_path / name)
        assert_one_line_error(excinfo, name)
    with pytest.raises(VisionInputError):
        preprocess_image(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(VisionInputError, match="aspect ratio"):
        preprocess_image(np.zeros((2, 500, 3), np.uint8))


# ----------------------------------------------------------------------------------------------
# prompt layout
# ----------------------------------------------------------------------------------------------


def _fake_visual(kind, grid_thw):
    t, h, w = grid_thw
    return VisualInput(kind, np.zeros((t * h * w, ROW), np.float32), grid_thw, 0.5 if kind == "video" else 1.0)


def test_build_multimodal_prompt_layout():
    tok = VisionTokenIds.from_config(
        {"vision_start_token_id": 151652, "vision_end_token_id": 151653, "image_token_id": 151655,
         "video_token_id": 151656, "text_config": {}}
    )
    assert tok == VisionTokenIds.qwen2_5_vl()
    img = _fake_visual("image", (1, 4, 6))  # 6 tokens
    vid = _fake_visual("video", (2, 4, 4))  # 8 tokens
    prompt = build_multimodal_prompt([[1, 2, 3], img, [4], vid, np.array([5, 6])], tok)
    s, e, ip, vp = 151652, 151653, 151655, 151656
    expected_ids = [1, 2, 3, s, *[ip] * 6, e, 4, s, *[vp] * 8, e, 5, 6]
    assert prompt.input_ids.dtype == np.int32 and prompt.mm_token_type_ids.dtype == np.int32
    assert prompt.input_ids.tolist() == expected_ids
    # HF ProcessorMixin.create_mm_token_type_ids: by token value, only pads are typed.
    hf_types = np.zeros(len(expected_ids), np.int32)
    hf_types[np.isin(expected_ids, [ip])] = 1
    hf_types[np.isin(expected_ids, [vp])] = 2
    np.testing.assert_array_equal(prompt.mm_token_type_ids, hf_types)
    assert (prompt.mm_token_type_ids == 1).sum() == img.num_tokens == 6
    assert (prompt.mm_token_type_ids == 2).sum() == vid.num_tokens == 8
    assert prompt.visuals == (img, vid)
    assert prompt.image_grid_thw.tolist() == [[1, 4, 6]] and prompt.video_grid_thw.tolist() == [[2, 4, 4]]
    assert prompt.second_per_grid_ts.tolist() == [0.5]
    with pytest.raises(ValueError, match="pad"):
        build_multimodal_prompt([[1, ip, 2]], tok)

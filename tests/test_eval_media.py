"""Video and audio task data: WAV decoding, resampling, frame sampling, the data layouts, suite keys, and the
synthetic tasks' answers checked against their own pixels and samples (no models here)."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_evaluator_support import png_bytes, write_parquet

from omnimerge.engine.errors import EvaluationError
from omnimerge.engine.evaluation.data import check_task_data, iter_samples
from omnimerge.engine.evaluation.media import decode_wav, encode_wav, resample, sample_frame_indices
from omnimerge.engine.evaluation.suites import TaskSpec, load_suite, parse_suite
from omnimerge.engine.evaluation.synthetic import COLOURS, HIGH_HZ, LOW_HZ, write_synthetic_tasks


def _wav(fmt_code: int, channels: int, rate: int, bits: int, payload: bytes) -> bytes:
    """A WAV file written field by field (RIFF header, 'fmt ' chunk, 'data' chunk)."""
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", fmt_code, channels, rate, rate * block, block, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


def test_wav_decoding_by_hand() -> None:
    # 16-bit stereo: frames (16384, -16384) and (32767, 32767) average to 0 and 32767/32768.
    audio = decode_wav(_wav(1, 2, 8000, 16, struct.pack("<4h", 16384, -16384, 32767, 32767)))
    assert audio.sampling_rate == 8000 and audio.waveform.tolist() == [0.0, 32767 / 32768]
    # 8-bit is unsigned around 128: 0 → -1, 128 → 0, 192 → 0.5.
    assert decode_wav(_wav(1, 1, 100, 8, bytes([0, 128, 192]))).waveform.tolist() == [-1.0, 0.0, 0.5]
    # 24-bit little-endian: 0x400000 = 2^22 → 0.5; 0xC00000 = -2^22 → -0.5.
    payload = bytes([0, 0, 0x40, 0, 0, 0xC0])
    assert decode_wav(_wav(1, 1, 100, 24, payload)).waveform.tolist() == [0.5, -0.5]
    # IEEE float 32-bit passes through.
    assert decode_wav(_wav(3, 1, 100, 32, struct.pack("<2f", 0.25, -0.75))).waveform.tolist() == [0.25, -0.75]
    # The writer: 16-bit PCM, so a round trip is exact to half a quantisation step (plus float32 rounding).
    wave = np.sin(np.linspace(0, 20, 500)) * 0.9
    back = decode_wav(encode_wav(wave, 22050))
    assert back.sampling_rate == 22050 and np.abs(back.waveform - wave).max() <= 0.5 / 32768 + 1e-7


def test_wav_errors_are_pinned() -> None:
    with pytest.raises(EvaluationError, match=r"Audio of sample 'q1' is not a WAV file \(it starts with b'fLaC"):
        decode_wav(b"fLaC" + bytes(40), "sample 'q1'")
    with pytest.raises(EvaluationError, match="is WAV with format code 2 and 4 bits; the evaluator reads PCM"):
        decode_wav(_wav(2, 1, 8000, 4, b"\0\0"))


def test_resample_a_whole_number_of_periods_is_exact() -> None:
    t8, t16 = np.arange(8000) / 8000, np.arange(16000) / 16000
    tone8, tone16 = np.sin(2 * np.pi * 440 * t8), np.sin(2 * np.pi * 440 * t16)
    assert np.abs(resample(tone8, 8000, 16000) - tone16).max() < 1e-5  # up
    assert np.abs(resample(tone16, 16000, 8000) - tone8).max() < 1e-5  # down
    assert len(resample(np.zeros(441), 44100, 16000)) == 160  # round(441 · 16000 / 44100)


def test_frame_sampling() -> None:
    assert sample_frame_indices(10, 4) == [0, 3, 6, 9]  # linspace(0, 9, 4) = 0, 3, 6, 9
    assert sample_frame_indices(6, 4) == [0, 1, 3, 5]  # 0, 1.67, 3.33, 5 truncated
    assert sample_frame_indices(3, 8) == sample_frame_indices(3, None) == [0, 1, 2]


def _video_task(path: str, **kw: object) -> TaskSpec:
    return TaskSpec(name="v", metric="exact_match_gqa", path=path, modality="video", **kw)  # type: ignore[arg-type]


def _audio_task(path: str, **kw: object) -> TaskSpec:
    return TaskSpec(name="a", metric="exact_match_gqa", path=path, modality="audio", columns={"answers": "question"},
                    **kw)  # type: ignore[arg-type]


def test_video_layouts(tmp_path: Path) -> None:
    frames = [png_bytes(i, (8, 8)) for i in range(3)]
    # Parquet: a list of HF Image structs, and a list of raw bytes.
    write_parquet(tmp_path / "structs" / "test.parquet", [
        {"question_id": "s", "video": [{"bytes": f, "path": None} for f in frames], "question": "q", "answers": ["a"]}])
    write_parquet(tmp_path / "raw" / "test.parquet", [{"video": frames, "question": "q", "answers": ["a"]}])
    # JSONL: frame paths relative to the data file, or one folder of frames (read in name order).
    for i, frame in enumerate(frames):
        (tmp_path / "js" / "clip").mkdir(parents=True, exist_ok=True)
        (tmp_path / "js" / "clip" / f"{2 - i}.png").write_bytes(frame)  # names 2, 1, 0: folder order is reversed
    row = {"video": [f"clip/{2 - i}.png" for i in range(3)], "question": "q", "answers": ["a"]}
    (tmp_path / "js" / "test.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "js" / "folder.jsonl").write_text(json.dumps({**row, "video": "clip"}) + "\n")
    assert next(iter_samples(_video_task("structs"), tmp_path)).video == tuple(frames)
    assert next(iter_samples(_video_task("raw"), tmp_path)).video == tuple(frames)
    listed = next(iter_samples(_video_task("js"), tmp_path))
    folder = next(iter_samples(_video_task("js", split="folder"), tmp_path))
    assert listed.video == tuple(frames) and folder.video == tuple(reversed(frames))
    assert listed.image is None and listed.audio is None
    # A missing column, a missing folder and a container file are named.
    write_parquet(tmp_path / "noframes" / "test.parquet", [{"image": frames[0], "question": "q", "answers": ["a"]}])
    assert "field 'video' needs column 'video'" in check_task_data(_video_task("noframes"), tmp_path)[0]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "test.jsonl").write_text(json.dumps({"video": "v.mp4", "question": "q", "answers": []}) + "\n")
    with pytest.raises(EvaluationError, match=r"Video of sample '0' of task 'v' is 'v.mp4', which is not a folder"):
        list(iter_samples(_video_task("bad"), tmp_path))


def test_audio_layouts(tmp_path: Path) -> None:
    wave = [0.0, 0.5, -0.5, 0.25]
    wav = encode_wav(wave, 8000)
    # One layout per file: a Parquet or JSONL column holds one type.
    write_parquet(tmp_path / "pq" / "struct.parquet",
                  [{"question_id": "struct", "audio": {"bytes": wav, "path": None}, "question": "q"}])
    write_parquet(tmp_path / "pq" / "raw.parquet", [{"question_id": "raw", "audio": wav, "question": "q"}])
    (tmp_path / "js").mkdir()
    (tmp_path / "js" / "clip.wav").write_bytes(wav)
    rows = {"decoded": {"audio": {"array": wave, "sampling_rate": 8000}},
            "floats": {"audio": wave, "sampling_rate": 8000},
            "path": {"audio": "clip.wav"},
            "hf_path": {"audio": {"bytes": None, "path": "clip.wav"}}}
    for name, row in rows.items():
        (tmp_path / "js" / f"{name}.jsonl").write_text(json.dumps({"question_id": name, "question": "q", **row}) + "\n")
    splits = [("pq", "struct"), ("pq", "raw"), *(("js", name) for name in rows)]
    samples = [next(iter_samples(_audio_task(folder, split=split), tmp_path)) for folder, split in splits]
    assert [s.question_id for s in samples] == ["struct", "raw", "decoded", "floats", "path", "hf_path"]
    for sample in samples:
        assert sample.audio.sampling_rate == 8000  # 0.5, -0.5, 0.25 are exact in 16-bit PCM (x · 32768)
        assert sample.audio.waveform.tolist() == wave and sample.video is None and sample.image is None
    (tmp_path / "norate").mkdir()
    (tmp_path / "norate" / "test.jsonl").write_text(json.dumps({"audio": wave, "question": "q"}) + "\n")
    with pytest.raises(EvaluationError, match="Audio of sample '0' of task 'a' is a list of floats but the sample has "
                                              "no sampling rate; add a 'sampling_rate' column"):
        list(iter_samples(_audio_task("norate"), tmp_path))


def test_suite_keys_for_modalities() -> None:
    suite = parse_suite({"tasks": [{"name": "v", "path": "v", "metric": "multiple_choice", "modality": "video",
                                    "num_frames": 8}]})  # fmt: skip
    assert (suite.tasks[0].modality, suite.tasks[0].num_frames) == ("video", 8)
    assert parse_suite({"tasks": [{"name": "i", "path": "i", "metric": "vqa_accuracy"}]}).tasks[0].modality == "image"
    bad = {"tasks": [
        {"name": "a", "path": "a", "metric": "vqa_accuracy", "modality": "sound"},
        {"name": "b", "path": "b", "metric": "vqa_accuracy", "modality": "audio", "num_frames": 4},
        {"name": "c", "path": "c", "metric": "vqa_accuracy", "modality": "video", "num_frames": 0},
        {"name": "d", "path": "d", "metric": "vqa_accuracy", "modality": "video",
         "images_from": {"path": "x", "key": "k"}},
    ]}  # fmt: skip
    with pytest.raises(EvaluationError) as info:
        parse_suite(bad, source="m.yaml")
    assert str(info.value).splitlines()[1:] == [
        "  - task 0 'a': unknown modality 'sound'; known: image, video, audio",
        "  - task 1 'b': num_frames is for video tasks, but the task's modality is 'audio'",
        "  - task 2 'c': num_frames must be a positive integer, got 0",
        "  - task 3 'd': images_from is for image tasks, but the task's modality is 'video'",
    ]


def _square(frame: bytes) -> tuple[tuple[int, int, int], float, float]:
    """The colour and centre of the one non-black square of a frame, measured from its pixels."""
    pixels = np.asarray(Image.open(io.BytesIO(frame)).convert("RGB")).astype(int)
    ys, xs = np.nonzero(pixels.sum(axis=2))
    return tuple(pixels[ys[0], xs[0]]), float(xs.mean()), float(ys.mean())


def _dominant_hz(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave))
    return float(np.argmax(spectrum) * rate / len(wave))


def test_synthetic_tasks_answer_what_their_media_show(tmp_path: Path) -> None:
    suites = write_synthetic_tasks(tmp_path / "a", samples=6, seed=3)
    write_synthetic_tasks(tmp_path / "b", samples=6, seed=3)

    def files(root: Path) -> dict[Path, bytes]:
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    assert files(tmp_path / "a") == files(tmp_path / "b")  # seeded: same bytes
    root = tmp_path / "a"
    by_task = {t.name: (t, list(iter_samples(t, root))) for m in suites for t in load_suite(suites[m]).tasks}
    assert {name: len(samples) for name, (_, samples) in by_task.items()} == {
        "image_colour": 6, "video_colour": 6, "video_direction": 6, "audio_pitch": 6, "audio_beeps": 6}
    assert {name: task.modality for name, (task, _) in by_task.items()} == {
        "image_colour": "image", "video_colour": "video", "video_direction": "video", "audio_pitch": "audio",
        "audio_beeps": "audio"}  # fmt: skip
    for sample in by_task["image_colour"][1]:
        assert COLOURS[sample.answers[0]] == _square(sample.image)[0]
    for sample in by_task["video_colour"][1]:
        assert len(sample.video) == 6 and {_square(f)[0] for f in sample.video} == {COLOURS[sample.answers[0]]}
    moves = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
    for sample in by_task["video_direction"][1]:
        (_, x0, y0), (_, x1, y1) = _square(sample.video[0]), _square(sample.video[-1])
        assert (int(np.sign(x1 - x0)), int(np.sign(y1 - y0))) == moves[sample.answers[0]]
    for sample in by_task["audio_pitch"][1]:
        expected = HIGH_HZ if sample.answers[0] == "high" else LOW_HZ
        assert sample.audio.sampling_rate == 16000 and _dominant_hz(sample.audio.waveform, 16000) == expected
    for sample in by_task["audio_beeps"][1]:
        blocks = sample.audio.waveform.reshape(-1, 80)  # 10 ms blocks at 8 kHz
        loud = np.sqrt((blocks**2).mean(axis=1)) > 0.1  # a beep's RMS is 0.5/√2, silence's 0
        bursts = int(loud[0]) + int(np.sum(loud[1:] & ~loud[:-1]))  # runs of loud blocks
        assert sample.audio.sampling_rate == 8000 and str(bursts) == sample.answers[0]


def test_frames_video_processor_is_its_image_processor_frame_by_frame() -> None:
    """Without torchvision, Video-LLaVA's videos go through its image processor one frame at a time."""
    from transformers import CLIPImageProcessorPil

    from omnimerge.engine.evaluation.loading import FramesVideoProcessor

    images = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    frames = [Image.open(io.BytesIO(png_bytes(i, (40, 32)))) for i in range(5)]
    out = FramesVideoProcessor(images)([frames[:3], frames[2:]], return_tensors="pt")["pixel_values_videos"]
    assert out.shape == (2, 3, 3, 28, 28)
    for v, video in enumerate([frames[:3], frames[2:]]):
        for k, frame in enumerate(video):
            assert np.array_equal(out[v, k].numpy(), images(images=frame, return_tensors="np")["pixel_values"][0])
    with pytest.raises(EvaluationError, match=r"Videos of one batch differ in frames or size \(\(3, 3, 28, 28\), "
                                              r"\(2, 3, 28, 28\)\); give each task's videos one frame count"):
        FramesVideoProcessor(images)([frames[:3], frames[:2]])

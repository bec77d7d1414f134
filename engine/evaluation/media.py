"""Images, video frames and audio waveforms of evaluation samples: reading, frame sampling, resampling.

Values a data column may hold (module ``data`` maps columns to fields):

- **image**: an HF Image struct ``{bytes, path}``, raw encoded bytes (PNG, JPEG, ...), or a path relative to the
  data file.
- **video**: a list of frames, each an image value as above (so a Parquet ``list<struct<bytes, path>>`` or
  ``list<binary>``, or a JSONL list of frame paths), or the path of a folder of frame images (read in name
  order). Videos are kept as decoded frames; container formats (mp4, ...) are not decoded.
- **audio**: an HF Audio struct ``{bytes, path}`` or raw bytes of a **PCM WAV** file (8/16/24/32-bit integer
  or 32-bit float, any channel count — channels are averaged), a path to such a file, an HF decoded Audio
  struct ``{array, sampling_rate}``, or a plain list of floats with the rate in the sample's
  ``sampling_rate`` field.

Only numpy, PIL and the standard library are used (no torchvision, librosa, soundfile or ffmpeg).
"""

from __future__ import annotations

import io
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from omnimerge.engine.errors import EvaluationError

__all__ = [
    "MODALITIES",
    "Audio",
    "image_bytes",
    "video_frames",
    "audio_clip",
    "decode_wav",
    "encode_wav",
    "resample",
    "sample_frame_indices",
    "prepare_sample_media",
]

logger = logging.getLogger(__name__)

MODALITIES = ("image", "video", "audio")
_FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")


@dataclass(frozen=True, eq=False)
class Audio:
    """A mono waveform: ``waveform`` is a float32 numpy array (nominally in [-1, 1]) at ``sampling_rate`` Hz."""

    waveform: Any
    sampling_rate: int

    @property
    def seconds(self) -> float:
        """Duration in seconds."""
        return len(self.waveform) / float(self.sampling_rate)


def image_bytes(value: Any, base: Path) -> bytes | None:
    """Encoded image bytes from an image value (module docstring); ``None`` for a missing value.

    Raises:
        EvaluationError: A path that does not exist (relative paths are under ``base``, the data file's folder).
    """
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
        if not value:
            return None
    path = Path(str(value))
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise EvaluationError(f"Image file '{path}' named in the data under {base} does not exist; copy the images.")
    return path.read_bytes()


def video_frames(value: Any, base: Path, where: str) -> tuple[bytes, ...] | None:
    """A video's frames as encoded image bytes, in order (module docstring for the accepted values).

    Raises:
        EvaluationError: A frame or folder that does not exist, an empty video, or a value that is not a video.
    """
    if value is None:
        return None
    if isinstance(value, (str, Path)):
        folder = Path(str(value))
        folder = folder if folder.is_absolute() else base / folder
        if not folder.is_dir():
            raise EvaluationError(
                f"Video of {where} is '{value}', which is not a folder of frames under {base}; give a list of frames "
                "(images) or a folder of frame images."
            )
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _FRAME_SUFFIXES)
        frames = tuple(p.read_bytes() for p in files)
    elif isinstance(value, (list, tuple)):
        frames = tuple(image_bytes(frame, base) for frame in value)  # type: ignore[misc]
        if any(frame is None for frame in frames):
            raise EvaluationError(f"Video of {where} has an empty frame; every frame must be an image.")
    else:
        raise EvaluationError(
            f"Video of {where} is a {type(value).__name__}; a video is a list of frames (images) or a folder of them. "
            "Container files (mp4, ...) are not decoded: extract the frames first (e.g. ffmpeg -i v.mp4 f%03d.png)."
        )
    if not frames:
        raise EvaluationError(f"Video of {where} has no frames.")
    return frames  # type: ignore[return-value]


def sample_frame_indices(total: int, wanted: int | None) -> list[int]:
    """Indices of ``wanted`` frames spread evenly over ``total``: ``linspace(0, total - 1, wanted)`` truncated to
    integers, as Video-LLaVA samples its 8 frames; every frame when ``wanted`` is ``None`` or ≥ ``total``.

    Example: ``sample_frame_indices(10, 4) == [0, 3, 6, 9]``.
    """
    import numpy as np

    if wanted is None or wanted >= total:
        return list(range(total))
    return [int(i) for i in np.linspace(0, total - 1, wanted).astype(int)]


def _pcm_to_float(frames: bytes, width: int, channels: int, is_float: bool) -> Any:
    import numpy as np

    if is_float:
        data = np.frombuffer(frames, dtype="<f4").astype(np.float32)
    elif width == 1:  # 8-bit WAV is unsigned
        data = (np.frombuffer(frames, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 3:
        raw = np.frombuffer(frames, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        ints = raw[:, 0] | (raw[:, 1] << 8) | (raw[:, 2] << 16)
        data = (np.where(ints >= 1 << 23, ints - (1 << 24), ints) / float(1 << 23)).astype(np.float32)
    else:
        dtype = {2: "<i2", 4: "<i4"}[width]
        data = np.frombuffer(frames, dtype=dtype).astype(np.float32) / float(1 << (8 * width - 1))
    return data.reshape(-1, channels).mean(axis=1).astype(np.float32)


def _wav_chunks(data: bytes, where: str) -> dict[bytes, bytes]:
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise EvaluationError(
            f"Audio of {where} is not a WAV file (it starts with {data[:12]!r}); the evaluator reads PCM WAV bytes or "
            "float arrays. Convert it first, e.g. `ffmpeg -i clip.flac -ac 1 clip.wav`."
        )
    chunks, offset = {}, 12
    while offset + 8 <= len(data):
        chunk_id, size = data[offset : offset + 4], struct.unpack("<I", data[offset + 4 : offset + 8])[0]
        chunks.setdefault(chunk_id, data[offset + 8 : offset + 8 + size])
        offset += 8 + size + (size & 1)
    return chunks


def decode_wav(data: bytes, where: str = "a sample") -> Audio:
    """Decode a WAV file (PCM integer or IEEE float) into a mono float32 waveform.

    Raises:
        EvaluationError: Not a WAV file, or an encoding other than PCM / IEEE float (the message says how to convert).
    """
    chunks = _wav_chunks(data, where)
    if b"fmt " not in chunks or b"data" not in chunks:
        raise EvaluationError(f"Audio of {where} is a WAV file without a 'fmt ' or 'data' chunk; it is truncated.")
    fmt = chunks[b"fmt "]
    code, channels, rate = struct.unpack("<HHI", fmt[:8])
    bits = struct.unpack("<H", fmt[14:16])[0]
    if code == 0xFFFE and len(fmt) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the sub-format's first two bytes say which
        code = struct.unpack("<H", fmt[24:26])[0]
    if code not in (1, 3) or (code == 3 and bits != 32) or (code == 1 and bits not in (8, 16, 24, 32)):
        raise EvaluationError(
            f"Audio of {where} is WAV with format code {code} and {bits} bits; the evaluator reads PCM "
            "(8/16/24/32-bit) and 32-bit float WAV. Convert it, e.g. `ffmpeg -i in.wav -c:a pcm_s16le out.wav`."
        )
    width = bits // 8
    frames = chunks[b"data"]
    frames = frames[: len(frames) - len(frames) % (width * channels)]
    return Audio(_pcm_to_float(frames, width, channels, code == 3), int(rate))


def encode_wav(waveform: Sequence[float] | Any, sampling_rate: int) -> bytes:
    """A mono 16-bit PCM WAV file of ``waveform``: ``round(x · 32768)`` clipped to [-32768, 32767], the inverse
    of :func:`decode_wav`'s ``/ 32768``; used to write task data."""
    import wave

    import numpy as np

    pcm = np.clip(np.round(np.asarray(waveform, dtype=np.float64) * 32768.0), -32768, 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(int(sampling_rate))
        handle.writeframes(pcm.tobytes())
    return buffer.getvalue()


def audio_clip(value: Any, base: Path, where: str, sampling_rate: Any = None) -> Audio | None:
    """A sample's audio from an audio value (module docstring); ``None`` for a missing value.

    Args:
        value: The column's value.
        base: Folder relative paths are under (the data file's).
        where: Names the sample in messages.
        sampling_rate: The sample's ``sampling_rate`` field, needed when ``value`` is a plain list of floats.

    Raises:
        EvaluationError: A missing file, a non-WAV encoding, or floats without a sampling rate.
    """
    import numpy as np

    if value is None:
        return None
    if isinstance(value, dict) and value.get("array") is not None:
        rate = value.get("sampling_rate") or sampling_rate
        if not rate:
            raise EvaluationError(f"Audio of {where} is an array without 'sampling_rate'; add it to the struct.")
        return Audio(np.asarray(value["array"], dtype=np.float32).reshape(-1), int(rate))
    if isinstance(value, (list, tuple)) or (hasattr(value, "dtype") and hasattr(value, "shape")):
        if not sampling_rate:
            raise EvaluationError(
                f"Audio of {where} is a list of floats but the sample has no sampling rate; add a 'sampling_rate' "
                "column (or map one with `columns: {sampling_rate: <column>}`)."
            )
        return Audio(np.asarray(value, dtype=np.float32).reshape(-1), int(sampling_rate))
    if isinstance(value, dict) and not value.get("bytes") and value.get("path"):
        value = value["path"]
    if isinstance(value, dict):
        value = value.get("bytes")
        if not value:
            return None
    if isinstance(value, (bytes, bytearray)):
        return decode_wav(bytes(value), where)
    path = Path(str(value))
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise EvaluationError(f"Audio file '{path}' named in the data under {base} does not exist; copy the audio.")
    return decode_wav(path.read_bytes(), f"{where} ({path})")


def resample(waveform: Any, from_rate: int, to_rate: int) -> Any:
    """Band-limited resampling by the FFT: keep (or zero-pad) the spectrum up to the lower Nyquist frequency.

    For a signal of ``n`` samples, ``m = round(n · to_rate / from_rate)``; ``y = irfft(X[:m//2+1], m) · m / n``
    with ``X = rfft(x)`` zero-padded when upsampling. The signal is treated as one period, so a tone holding a
    whole number of periods is resampled exactly; other clips get small edge effects.
    """
    import numpy as np

    x = np.asarray(waveform, dtype=np.float64)
    if from_rate == to_rate or len(x) == 0:
        return x.astype(np.float32)
    n = len(x)
    m = max(1, int(round(n * to_rate / from_rate)))
    spectrum = np.fft.rfft(x)
    bins = m // 2 + 1
    if bins <= len(spectrum):
        spectrum = spectrum[:bins].copy()
    else:
        spectrum = np.concatenate([spectrum, np.zeros(bins - len(spectrum), dtype=spectrum.dtype)])
    if n % 2 == 0 and m > n:  # the old Nyquist bin was the sum of two conjugate halves: split it
        spectrum[n // 2] *= 0.5
    return (np.fft.irfft(spectrum, m) * (m / n)).astype(np.float32)


def prepare_sample_media(task: Any, sample: Any, sampling_rate: int | None) -> tuple[Any, Any, Any, dict[str, Any]]:
    """One sample's model input for its task's modality, decoded: ``(image, frames, waveform, info)``.

    An image task gives a PIL image (``None`` for a text-only sample); a video task the PIL frames sampled by
    :func:`sample_frame_indices` with the task's ``num_frames``; an audio task the waveform resampled to
    ``sampling_rate`` (the model's feature extractor's). ``info`` holds what is recorded with the prediction:
    ``frames`` and ``frame_indices``, or ``sampling_rate``, ``source_sampling_rate`` and ``audio_seconds``.

    Raises:
        EvaluationError: The sample lacks its task's input, or audio is asked of a model without an audio rate.
    """
    from PIL import Image

    def decode(data: bytes) -> Any:
        return Image.open(io.BytesIO(data)).convert("RGB")

    where = f"Sample '{sample.question_id}' of {task.modality} task '{task.name}'"
    if task.modality == "video":
        if not sample.video:
            raise EvaluationError(f"{where} has no video; map the column of its frames (`columns: {{video: ...}}`).")
        indices = sample_frame_indices(len(sample.video), task.num_frames)
        frames = [decode(sample.video[i]) for i in indices]
        return None, frames, None, {"frames": len(indices), "frame_indices": indices}
    if task.modality == "audio":
        if sample.audio is None:
            raise EvaluationError(f"{where} has no audio; map the column holding it with `columns: {{audio: ...}}`.")
        if not sampling_rate:
            raise EvaluationError(f"{where}: the model's processor has no audio feature extractor with a rate.")
        waveform = resample(sample.audio.waveform, sample.audio.sampling_rate, sampling_rate)
        info = {"sampling_rate": sampling_rate, "source_sampling_rate": sample.audio.sampling_rate,
                "audio_seconds": round(sample.audio.seconds, 4)}  # fmt: skip
        return None, None, waveform, info
    return (decode(sample.image) if sample.image else None), None, None, {}

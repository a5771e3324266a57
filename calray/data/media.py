"""Decoding shared by the real-data loaders: images, wav audio, spectrograms, frame listings.

Every failure raises one `DatasetError` that names the file and the preparation script.
"""

from __future__ import annotations

import io
import math
import pickle
import re
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from calray.errors import DatasetError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


# ---------------------------------------------------------------- images


def open_image(path, script: str | None, mode: str = "RGB"):
    """Decode an image fully (a truncated file fails here, not later) and convert it to `mode`."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return im.convert(mode)
    except FileNotFoundError:
        raise DatasetError("image not found", path, script) from None
    except Exception as e:  # PIL raises OSError/UnidentifiedImageError/SyntaxError for bad files
        raise DatasetError(f"cannot decode image ({type(e).__name__}: {e})", path, script) from None


def to_tensor(img: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 H×W×C (or H×W) → normalised float C×H×W."""
    arr = np.asarray(img)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if not arr.flags.writeable:  # views of PIL images are read-only; torch wants writable memory
        arr = arr.copy()
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (t - m) / s


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def list_frames(directory: Path) -> list[Path]:
    """Image files of a frame directory in natural order (frame_2 before frame_10), never os order."""
    if not directory.is_dir():
        return []
    files = [p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]
    return sorted(files, key=lambda p: _natural_key(p.name))


def frame_indices(available: int, count: int, train: bool) -> list[int]:
    """Which of a clip's `available` frames to use, in temporal order.

    The clip is cut into `count` equal segments; evaluation takes each segment's centre frame
    (deterministic), training a uniformly random frame of each segment (torch's generator, so
    the trainer's seed and DataLoader worker seeding make it reproducible). With fewer frames
    than `count`, frames repeat.
    """
    if available < 1:
        raise ValueError("a clip needs at least one frame")
    out = []
    for k in range(count):
        lo = (k * available) // count
        hi = max(((k + 1) * available) // count, lo + 1)
        if train:
            out.append(int(torch.randint(lo, hi, (1,)).item()))
        else:
            out.append(min(int((k + 0.5) * available / count), available - 1))
    return out


# ---------------------------------------------------------------- audio


def read_wav(path, script: str | None) -> tuple[np.ndarray, int]:
    """Mono float32 samples in [-1, 1] and the sample rate (channels averaged, as librosa does)."""
    import soundfile as sf

    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except FileNotFoundError:
        raise DatasetError("audio file not found", path, script) from None
    except Exception as e:  # soundfile.LibsndfileError / RuntimeError for unreadable files
        raise DatasetError(f"cannot read audio ({type(e).__name__}: {e})", path, script) from None
    if data.shape[0] == 0:
        raise DatasetError("audio file has no samples", path, script)
    return data.mean(axis=1), int(sr)


def resample(samples: np.ndarray, sr_from: int, sr_to: int) -> np.ndarray:
    """Polyphase resampling (scipy); close to, not bit-identical with, librosa's resampler."""
    if sr_from == sr_to:
        return samples.astype(np.float32)
    from scipy.signal import resample_poly

    g = math.gcd(sr_from, sr_to)
    return resample_poly(samples, sr_to // g, sr_from // g).astype(np.float32)


class SpectrogramSettings(BaseModel):
    """OGM-GE's CREMA-D recipe: 22,050 Hz, tile to 3 s, clip to [−1, 1], log(|STFT| + 1e-7)."""

    model_config = ConfigDict(extra="forbid")
    sample_rate: int = Field(22050, ge=1000)
    seconds: float = Field(3.0, gt=0.0)
    n_fft: int = Field(512, ge=16)
    hop: int = Field(353, ge=1)
    pad_mode: Literal["reflect", "constant"] = "reflect"  # librosa < 0.10 padded by reflection

    def shape(self) -> tuple[int, int]:
        n = int(round(self.sample_rate * self.seconds))
        return self.n_fft // 2 + 1, 1 + n // self.hop


def stft_magnitude(x: np.ndarray, n_fft: int, hop: int, pad_mode: str = "reflect") -> np.ndarray:
    """|STFT| with a periodic Hann window and centred frames (librosa.stft's defaults): F×T."""
    x = np.asarray(x, dtype=np.float64)
    pad = n_fft // 2
    x = np.pad(x, pad, mode=pad_mode)
    n_frames = 1 + (len(x) - n_fft) // hop
    idx = np.arange(n_fft)[None, :] + hop * np.arange(n_frames)[:, None]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    return np.abs(np.fft.rfft(x[idx] * window, axis=1)).T


def ogm_spectrogram(samples: np.ndarray, sr: int, s: SpectrogramSettings) -> np.ndarray:
    """The OGM-GE CREMA-D log-magnitude spectrogram (no normalisation), float32 F×T (257×188)."""
    y = resample(samples, sr, s.sample_rate)
    n = int(round(s.sample_rate * s.seconds))
    y = np.tile(y, int(math.ceil(n / len(y))) if len(y) < n else 1)[:n]
    y = np.clip(y, -1.0, 1.0)
    spec = np.log(stft_magnitude(y, s.n_fft, s.hop, s.pad_mode) + 1e-7)
    return spec.astype(np.float32)


# ---------------------------------------------------------------- stored spectrograms


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: a pickle from the internet must not run code."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("builtins", "slice"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed")


def load_spectrogram_file(path, script: str | None) -> np.ndarray:
    """A stored spectrogram: OGM-GE's pickled array (`.pkl`) or a `.npy` file; float32 2-D."""
    path = Path(path)
    try:
        if path.suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        else:
            arr = _ArrayUnpickler(io.BytesIO(path.read_bytes())).load()
    except FileNotFoundError:
        raise DatasetError("spectrogram file not found", path, script) from None
    except Exception as e:
        raise DatasetError(f"cannot read spectrogram ({type(e).__name__}: {e})", path, script) from None
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.number):
        raise DatasetError(f"spectrogram must be a 2-D numeric array, got {arr.dtype} {arr.shape}", path, script)
    if not np.isfinite(arr).all():
        raise DatasetError("spectrogram contains NaN or inf", path, script)
    return arr.astype(np.float32)

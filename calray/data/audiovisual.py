"""The audio-visual clip dataset behind `cremad`, `ks` and `ave`.

A clip has a label, a sorted list of frame files and one audio file (a wav turned into the
OGM-GE spectrogram, or a stored spectrogram). Items are `({"audio": 1×F×T, "visual":
T×3×S×S}, label)` with T = `params.frames` frames chosen by `media.frame_indices` and used.

Frame transforms follow OGM-GE: train RandomResizedCrop(S) + horizontal flip per frame,
evaluation Resize((S, S)); ImageNet normalisation. Attacks act on the uint8 frames after the
geometric transform and on the spectrogram (calray.data.noise).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import Dataset

from calray.data.cache import RowCache, cache_dir_for
from calray.data.media import (IMAGENET_MEAN, IMAGENET_STD, SpectrogramSettings, frame_indices, list_frames,
                               load_spectrogram_file, ogm_spectrogram, open_image, read_wav, to_tensor)
from calray.errors import DatasetError
from calray.data.noise import Attack

MODALITIES = ["audio", "visual"]


class AVParams(BaseModel):
    """`data.params` shared by the audio-visual datasets."""

    model_config = ConfigDict(extra="forbid")
    frames: int = Field(3, ge=1)  # frames per clip (logged in data_info.json)
    image_size: int = Field(224, ge=8)
    audio: Literal["wav", "spec"] = "spec"  # wav: compute the spectrogram; spec: read a stored one
    audio_dir: str = "audio"  # wav source: <audio_dir>/<id>.wav
    spec_dir: str = "audio_spec"  # spec source: <spec_dir>/<id>.pkl or .npy
    visual_dir: str = "visual"  # frames: <visual_dir>/<id>/*.jpg
    spectrogram: SpectrogramSettings = Field(default_factory=SpectrogramSettings)
    on_missing: Literal["error", "skip"] = "error"  # a listed clip whose files are missing
    cache_frames: bool = False  # with data.cache_dir: cache decoded frames too (see docs/DATASETS.md)


@dataclass(frozen=True)
class Clip:
    id: str
    label: int
    frames: tuple[str, ...]
    audio: str


class AVClipDataset(Dataset):
    def __init__(self, clips: list[Clip], *, split: str, train: bool, params: AVParams, attack: Attack,
                 modalities: list[str], script: str, spec_shape: tuple[int, int] | None,
                 spec_cache: RowCache | None = None, frame_cache: RowCache | None = None):
        self.clips = clips
        self.labels = [c.label for c in clips]
        self.split = split
        self.train = train
        self.p = params
        self.attack = attack
        self.modalities = modalities
        self.script = script
        self.spec_shape = spec_shape
        self.spec_cache = spec_cache
        self.frame_cache = frame_cache
        self.cache_size = frame_cache.shape[2] if frame_cache is not None else None

    def __len__(self) -> int:
        return len(self.clips)

    # -- audio ------------------------------------------------------------------------

    def _decode_spectrogram(self, i: int) -> np.ndarray:
        clip = self.clips[i]
        if self.p.audio == "wav":
            samples, sr = read_wav(clip.audio, self.script)
            spec = ogm_spectrogram(samples, sr, self.p.spectrogram)
        else:
            spec = load_spectrogram_file(clip.audio, self.script)
        if self.spec_shape is not None and spec.shape != tuple(self.spec_shape):
            raise DatasetError(f"spectrogram has shape {spec.shape}, but this dataset's are {tuple(self.spec_shape)} "
                               "(all must match to be batched)", clip.audio, self.script)
        return spec

    def spectrogram(self, i: int) -> np.ndarray:
        if self.spec_cache is not None:
            return self.spec_cache.get(i, lambda: self._decode_spectrogram(i))
        return self._decode_spectrogram(i)

    # -- frames -----------------------------------------------------------------------

    def _decode_all_frames(self, i: int) -> np.ndarray:
        """Every frame of clip i resized to the cache size, padded to the cache's frame count."""
        from PIL import Image

        s = self.cache_size
        out = np.zeros(self.frame_cache.shape[1:], dtype=np.uint8)
        for k, path in enumerate(self.clips[i].frames):
            out[k] = np.asarray(open_image(path, self.script).resize((s, s), Image.BILINEAR))
        return out

    def _frame_image(self, i: int, k: int, cached: np.ndarray | None):
        from PIL import Image

        if cached is not None:
            return Image.fromarray(cached[k])
        return open_image(self.clips[i].frames[k], self.script)

    def _geometric(self, img) -> np.ndarray:
        from PIL import Image
        from torchvision import transforms as T

        s = self.p.image_size
        if self.train:
            img = T.RandomResizedCrop(s)(img)
            if torch.rand(1).item() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        elif img.size != (s, s):
            img = T.Resize((s, s))(img)
        return np.asarray(img)

    def visual(self, i: int) -> torch.Tensor:
        clip = self.clips[i]
        chosen = frame_indices(len(clip.frames), self.p.frames, train=self.train)
        cached = self.frame_cache.get(i, lambda: self._decode_all_frames(i)) if self.frame_cache is not None else None
        frames = [self._geometric(self._frame_image(i, k, cached)) for k in chosen]
        frames = self.attack.frames(frames, "visual", i)
        return torch.stack([to_tensor(f, IMAGENET_MEAN, IMAGENET_STD) for f in frames])

    def __getitem__(self, i: int):
        inputs = {}
        if "audio" in self.modalities:
            spec = self.attack.spectrogram(self.spectrogram(i), "audio", i)
            inputs["audio"] = torch.from_numpy(np.ascontiguousarray(spec, dtype=np.float32)).unsqueeze(0)
        if "visual" in self.modalities:
            inputs["visual"] = self.visual(i)
        return inputs, self.clips[i].label


# ---------------------------------------------------------------- assembling clips


def spec_path(root: Path, params: AVParams, clip_id: str) -> Path:
    """Where clip `clip_id`'s audio lives for the configured source (a missing .pkl falls back to .npy)."""
    if params.audio == "wav":
        return root / params.audio_dir / f"{clip_id}.wav"
    pkl = root / params.spec_dir / f"{clip_id}.pkl"
    if pkl.exists():
        return pkl
    npy = pkl.with_suffix(".npy")
    return npy if npy.exists() else pkl


def locate_clip(root: Path, params: AVParams, split: str, clip_id: str, label: int, skips) -> Clip | None:
    """The clip's sorted frames and audio file; None (counted in `skips`) when either is missing."""
    frame_dir = root / params.visual_dir / clip_id
    frames = list_frames(frame_dir)
    audio = spec_path(root, params, clip_id)
    if not frames:
        skips.missing(split, clip_id, frame_dir, "frames")
        return None
    if not audio.exists():
        skips.missing(split, clip_id, audio, "audio")
        return None
    return Clip(clip_id, label, tuple(str(f) for f in frames), str(audio))


def expected_spec_shape(clips: list[Clip], params: AVParams, script: str) -> tuple[int, int] | None:
    """The spectrogram shape every clip must have: computed ones from the settings, stored ones
    from the first clip."""
    if params.audio == "wav":
        return params.spectrogram.shape()
    if not clips:
        return None
    return tuple(load_spectrogram_file(clips[0].audio, script).shape)


class AVDatasetFactory:
    """Makes one AVClipDataset per split, with the decode-once caches when data.cache_dir is set."""

    def __init__(self, cfg, dataset: str, root: Path, params: AVParams, modalities: list[str], script: str,
                 spec_shape, list_digest: str):
        self.cfg = cfg
        self.dataset = dataset
        self.root = root
        self.p = params
        self.modalities = modalities
        self.script = script
        self.spec_shape = spec_shape
        self.list_digest = list_digest

    def _settings(self, split_role: str, n: int, extra: dict) -> dict:
        return {"dataset": self.dataset, "root": str(self.root.resolve()), "lists": self.list_digest,
                "role": split_role, "n": n, **extra}

    def caches(self, clips: list[Clip], train: bool) -> tuple[RowCache | None, RowCache | None]:
        cache_root = self.cfg.data.cache_dir
        if not cache_root or not clips:
            return None, None
        role = "train" if train else "eval"
        ids = [c.id for c in clips]
        spec_cache = frame_cache = None
        if "audio" in self.modalities and self.spec_shape is not None:
            settings = self._settings(role, len(clips), {"ids": ids, "audio": self.p.audio, "spec_dir": self.p.spec_dir,
                                                        "audio_dir": self.p.audio_dir,
                                                        "spectrogram": self.p.spectrogram.model_dump()})
            settings["role"] = "audio"  # the spectrogram does not depend on train/eval transforms
            spec_cache = RowCache(cache_dir_for(cache_root, self.dataset, settings), "spectrogram", len(clips),
                                  self.spec_shape, np.float32)
        if "visual" in self.modalities and self.p.cache_frames:
            # eval frames are stored at the final size (exact); train frames at the 256/224 load
            # size that RandomResizedCrop then samples from (an approximation, documented)
            s = self.p.image_size if not train else int(round(self.p.image_size * 256 / 224))
            max_frames = max(len(c.frames) for c in clips)
            settings = self._settings(role, len(clips), {"ids": ids, "frame_size": s, "max_frames": max_frames,
                                                        "frames_digest": _frames_digest(clips)})
            frame_cache = RowCache(cache_dir_for(cache_root, self.dataset, settings), "frames", len(clips),
                                   (max_frames, s, s, 3), np.uint8)
        return spec_cache, frame_cache

    def __call__(self, clips: list[Clip], split: str, attack: Attack) -> AVClipDataset:
        train = split == "train"
        spec_cache, frame_cache = self.caches(clips, train)
        return AVClipDataset(clips, split=split, train=train, params=self.p, attack=attack, modalities=self.modalities,
                             script=self.script, spec_shape=self.spec_shape, spec_cache=spec_cache,
                             frame_cache=frame_cache)


def _frames_digest(clips: list[Clip]) -> str:
    import hashlib

    h = hashlib.sha256()
    for c in clips:
        h.update(c.id.encode())
        h.update(str(len(c.frames)).encode())
    return h.hexdigest()[:16]


def av_info(params: AVParams, clips_by_split: dict[str, list[Clip] | None], spec_shape) -> dict:
    """Frame and audio facts for data_info.json (frame counts are a known source of cross-paper gaps)."""
    short = {s: sum(1 for c in clips if len(c.frames) < params.frames)
             for s, clips in clips_by_split.items() if clips is not None}
    return {
        "frames_per_clip": params.frames,
        "frame_selection": "train: a random frame from each of T equal segments; eval: segment centres",
        "clips_with_fewer_frames_than_T": short,
        "image_size": params.image_size,
        "audio_source": params.audio,
        "spectrogram_shape": list(spec_shape) if spec_shape else None,
        "spectrogram_settings": params.spectrogram.model_dump() if params.audio == "wav" else None,
    }

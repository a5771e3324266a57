"""Noise attacks with the anchors' (QMF) ε semantics, and where each dataset applies them.

The primitives work on uint8 images (H×W×C or H×W, 0–255), strings and spectrograms, and
take a `numpy.random.Generator`; `Attack` maps a `NoiseConfig` (kind, ε, mode, …) and a
dataset to them. See docs/DATASETS.md for the per-dataset table; in short:

- Gaussian (images): std = ε·std_scale on the 0–255 scale (std_scale 10 for MVSA and the
  audio-visual frames, 1 for NYUD2 — QMF's `severity`); one noise plane shared by all
  channels; each image attacked with probability 0.5.
- Salt-pepper (images): a `density` fraction of pixels (default 0.1), half set to 0 and half
  to 255, the same mask on every channel; each image attacked with probability 0.5·ε/100
  (`legacy`: QMF before 2025-06-28, 0.5·ε/10).
- Text (MVSA): when ε > 0 each sample is attacked with probability 0.5; each space-separated
  token becomes `_` with probability 0.1·ε.
- Spectrograms (audio-visual sets, our definition): Gaussian std = ε·audio_scale·std(spectrogram);
  salt-pepper sets a `density` fraction of time-frequency bins to the spectrogram's min or max.

Noise is drawn per sample from a generator seeded by (noise seed, split, sample index,
modality), so the same seed gives the same noise whatever the worker, epoch or order, and the
noise seed is independent of the training seed. `qmf_compat` reproduces QMF's Gaussian
quirks instead: one fixed noise field (seed 0) for every image and negative values wrapping
through the uint8 cast.

`fill_missing` is the robustness grid's `missing` kind (a modality absent at test time, zero or
training-mean input): not a `noise.kind`, it replaces the model's input tensors of a batch.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from calray.errors import ConfigError
from calray.registry import NOISE_KINDS

SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


# ---------------------------------------------------------------- primitives


def _check_image(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim not in (2, 3):
        raise ValueError(f"expected a uint8 H×W or H×W×C image, got {img.dtype} with shape {img.shape}")
    return img


def gaussian_noise(img: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
    """img + N(0, std²) with one noise plane shared by all channels, rounded and clipped to 0–255."""
    img = _check_image(img)
    plane = rng.normal(0.0, std, size=img.shape[:2])
    if img.ndim == 3:
        plane = plane[:, :, None]
    return np.clip(np.rint(img + plane), 0, 255).astype(np.uint8)


def qmf_gaussian_noise(img: np.ndarray, std: float) -> np.ndarray:
    """QMF's AddGaussianNoise, quirks included.

    The field is drawn after reseeding the legacy global generator with 0, so every image of
    a given size gets the same noise; values above 255 are clipped but negative values are
    truncated towards zero and wrap modulo 256 (what the uint8 cast does on x86).
    """
    img = _check_image(img)
    plane = np.random.RandomState(0).normal(loc=0.0, scale=std, size=img.shape[:2] + (1,))
    if img.ndim == 2:
        plane = plane[:, :, 0]
    else:
        plane = np.repeat(plane, img.shape[2], axis=2)
    out = plane + img
    out[out > 255] = 255
    return (np.trunc(out).astype(np.int64) % 256).astype(np.uint8)


def salt_pepper_noise(img: np.ndarray, density: float, rng: np.random.Generator) -> np.ndarray:
    """Set a `density` fraction of pixels to 0 (half) or 255 (half), the same mask on every channel."""
    img = _check_image(img)
    u = rng.random(img.shape[:2])
    out = img.copy()
    out[u < density / 2] = 0
    out[(u >= density / 2) & (u < density)] = 255
    return out


# noise kinds, as `noise.kind` names them: "none", or the image attack each one applies
NOISE_KINDS.register("none")(None)
NOISE_KINDS.register("gaussian")(gaussian_noise)
NOISE_KINDS.register("salt_pepper")(salt_pepper_noise)


def text_noise(text: str, p_word: float, rng: np.random.Generator) -> str:
    """Replace each space-separated token by `_` with probability `p_word` (QMF splits on ' ')."""
    words = text.split(" ")
    hit = rng.random(len(words)) < p_word
    return " ".join("_" if h else w for w, h in zip(words, hit))


def spectrogram_gaussian_noise(spec: np.ndarray, rel_std: float, rng: np.random.Generator) -> np.ndarray:
    """spec + N(0, (rel_std·std(spec))²): the noise level is relative to the spectrogram's spread."""
    spec = np.asarray(spec, dtype=np.float32)
    scale = float(spec.std()) * rel_std
    return (spec + rng.normal(0.0, scale, size=spec.shape)).astype(np.float32)


def spectrogram_salt_pepper_noise(spec: np.ndarray, density: float, rng: np.random.Generator) -> np.ndarray:
    """Set a `density` fraction of bins to the spectrogram's minimum (half) or maximum (half)."""
    spec = np.array(spec, dtype=np.float32)
    u = rng.random(spec.shape)
    lo, hi = float(spec.min()), float(spec.max())
    spec[u < density / 2] = lo
    spec[(u >= density / 2) & (u < density)] = hi
    return spec


# ---------------------------------------------------------------- per-dataset mapping


@dataclass(frozen=True)
class NoiseProfile:
    """Which modalities of a dataset can be attacked, and how ε maps to an image noise std."""

    images: tuple[str, ...] = ()
    text: tuple[str, ...] = ()
    spectrograms: tuple[str, ...] = ()
    std_scale: float = 10.0

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.images + self.text + self.spectrograms


PROFILES: dict[str, NoiseProfile] = {
    "mvsa_single": NoiseProfile(images=("image",), text=("text",), std_scale=10.0),
    "nyud2": NoiseProfile(images=("rgb", "depth"), std_scale=1.0),
    "cremad": NoiseProfile(images=("visual",), spectrograms=("audio",), std_scale=10.0),
    "ks": NoiseProfile(images=("visual",), spectrograms=("audio",), std_scale=10.0),
    "ave": NoiseProfile(images=("visual",), spectrograms=("audio",), std_scale=10.0),
}


def _stream(name: str) -> int:
    return zlib.crc32(name.encode())


@dataclass(frozen=True)
class Attack:
    """The attack one split of one dataset receives; inactive attacks leave inputs untouched."""

    kind: str = "none"
    eps: float = 0.0
    split: str = "test"
    active: bool = False
    seed: int = 0
    modalities: tuple[str, ...] = ()
    profile: NoiseProfile = field(default_factory=NoiseProfile)
    image_std: float = 0.0
    p_image: float = 0.0
    p_text: float = 0.0
    p_word: float = 0.0
    density: float = 0.1
    audio_rel_std: float = 0.0
    qmf_compat: bool = False

    @classmethod
    def from_config(cls, noise, dataset: str, split: str) -> "Attack":
        """Map a NoiseConfig to the attack `split` of `dataset` receives.

        Mode `test` attacks the test split only (train and validation stay clean, so model
        selection never sees noise); `train+test` attacks train, validation and test.
        """
        if split not in SPLIT_IDS:
            raise ValueError(f"unknown split {split!r}")
        profile = PROFILES.get(dataset)
        if profile is None:
            raise ConfigError(f"noise: dataset {dataset!r} has no noise profile; known: {sorted(PROFILES)}")
        if noise.modalities is not None:
            unknown = [m for m in noise.modalities if m not in profile.modalities]
            if unknown:
                raise ConfigError(
                    f"noise.modalities: {unknown} cannot be attacked on {dataset!r} (it has {list(profile.modalities)})"
                )
            modalities = tuple(noise.modalities)
        else:
            modalities = profile.images + profile.spectrograms + (profile.text if noise.text else ())
        eps = float(noise.eps)
        active = noise.kind != "none" and eps > 0 and (split == "test" or noise.mode == "train+test")
        if noise.kind == "salt_pepper":
            p_image = 0.5 * eps / (10.0 if noise.legacy else 100.0)
        else:
            p_image = 0.5
        if noise.p_apply is not None:
            p_image = noise.p_apply
        std_scale = profile.std_scale if noise.std_scale is None else noise.std_scale
        return cls(
            kind=noise.kind, eps=eps, split=split, active=active, seed=int(noise.seed) % (1 << 63),
            modalities=modalities, profile=profile,
            image_std=eps * std_scale, p_image=min(p_image, 1.0),
            p_text=0.5 if noise.p_apply is None else noise.p_apply, p_word=min(0.1 * eps, 1.0),
            density=noise.density, audio_rel_std=eps * noise.audio_scale, qmf_compat=noise.qmf_compat,
        )

    def targets(self, modality: str) -> bool:
        return self.active and modality in self.modalities

    def rng(self, index: int, modality: str) -> np.random.Generator:
        return np.random.default_rng([self.seed, SPLIT_IDS[self.split], int(index), _stream(modality)])

    # -- per modality ---------------------------------------------------------------

    def _image(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.kind == "gaussian":
            return qmf_gaussian_noise(img, self.image_std) if self.qmf_compat else gaussian_noise(img, self.image_std, rng)
        return salt_pepper_noise(img, self.density, rng)

    def image(self, img: np.ndarray, modality: str, index: int) -> np.ndarray:
        """Attack one uint8 image of sample `index` with probability p_image."""
        if not self.targets(modality):
            return img
        rng = self.rng(index, modality)
        if rng.random() >= self.p_image:
            return img
        return self._image(img, rng)

    def frames(self, frames: Sequence[np.ndarray], modality: str, index: int) -> list[np.ndarray]:
        """Attack a clip's frames: one decision per clip, fresh noise for every frame."""
        frames = list(frames)
        if not self.targets(modality):
            return frames
        rng = self.rng(index, modality)
        if rng.random() >= self.p_image:
            return frames
        return [self._image(f, rng) for f in frames]

    def text(self, text: str, modality: str, index: int) -> str:
        if not self.targets(modality):
            return text
        rng = self.rng(index, modality)
        if rng.random() >= self.p_text:
            return text
        return text_noise(text, self.p_word, rng)

    def spectrogram(self, spec: np.ndarray, modality: str, index: int) -> np.ndarray:
        if not self.targets(modality):
            return spec
        rng = self.rng(index, modality)
        if rng.random() >= self.p_image:
            return spec
        if self.kind == "gaussian":
            return spectrogram_gaussian_noise(spec, self.audio_rel_std, rng)
        return spectrogram_salt_pepper_noise(spec, self.density, rng)

    def describe(self) -> dict:
        """What this split receives, for the run's data_info.json."""
        if not self.active:
            return {"split": self.split, "active": False}
        out = {"split": self.split, "active": True, "kind": self.kind, "eps": self.eps, "seed": self.seed,
               "modalities": list(self.modalities), "qmf_compat": self.qmf_compat}
        images = [m for m in self.modalities if m in self.profile.images]
        if images:
            out["images"] = {"modalities": images, "p_apply": self.p_image}
            if self.kind == "gaussian":
                out["images"]["std_0_255"] = self.image_std
            else:
                out["images"]["density"] = self.density
        if any(m in self.profile.spectrograms for m in self.modalities):
            out["spectrograms"] = (
                {"p_apply": self.p_image, "std_relative": self.audio_rel_std}
                if self.kind == "gaussian" else {"p_apply": self.p_image, "density": self.density}
            )
        if any(m in self.profile.text for m in self.modalities):
            out["text"] = {"p_sample": self.p_text, "p_word": self.p_word}
        return out


# ---------------------------------------------------------------- missing modality (evaluation only)

MISSING_FILLS = ("zero", "mean")  # what an absent modality's model input becomes


def fill_missing(inputs: dict, fills: dict):
    """A batch's `inputs` with each modality of `fills` replaced: the robustness grid's `missing`
    kind (a modality absent at test time; calray.robustness.evaluation).

    `fills[m]` is None (zero input: every tensor of m zeroed, a text dict's token ids, attention
    mask and segment ids included — BERT's [PAD] everywhere) or the model input to use for every
    sample (the training-set mean input: a tensor of one sample's shape, or a dict of them),
    broadcast over the batch. Integer tensors have no mean and are zeroed under either rule. Not a
    `noise.kind`: it acts on the model's input tensors after each dataset's own pipeline, not on
    raw images, text or spectrograms, so a run config cannot select it.
    """
    out = dict(inputs)
    for m, fill in fills.items():
        out[m] = _filled(inputs[m], fill)
    return out


def _filled(x, fill):
    if isinstance(x, dict):
        return {k: _filled(v, None if fill is None else fill.get(k)) for k, v in x.items()}
    if fill is None or not x.is_floating_point():
        return x.new_zeros(x.shape)
    return fill.to(device=x.device, dtype=x.dtype).expand(x.shape).clone()


def split_attacks(noise, dataset: str) -> dict[str, Attack]:
    """The attack of each split, keyed train/val/test."""
    return {s: Attack.from_config(noise, dataset, s) for s in SPLIT_IDS}

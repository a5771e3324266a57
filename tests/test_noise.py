"""Noise attacks: primitives' statistics, the ε → (std, p_apply) mapping, seeding and modes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from calray.config import NoiseConfig
from calray.errors import ConfigError
from calray.data.noise import (Attack, gaussian_noise, qmf_gaussian_noise, salt_pepper_noise, spectrogram_gaussian_noise,
                          spectrogram_salt_pepper_noise, split_attacks, text_noise)


def gray(h=200, w=200, c=3, value=128):
    return np.full((h, w, c), value, dtype=np.uint8)


def within(observed: float, expected: float, sd: float, k: float = 4.0) -> bool:
    return abs(observed - expected) <= k * sd


# ---------------------------------------------------------------- primitives


@pytest.mark.parametrize("eps", [1.0, 2.0])
def test_gaussian_std_is_ten_eps_and_plane_is_shared(eps):
    img = gray()
    std = 10 * eps  # MVSA's scale; small enough that clipping at 0/255 is negligible around 128
    out = gaussian_noise(img, std, np.random.default_rng(0))
    diff = out.astype(float) - img
    n = diff[:, :, 0].size
    assert within(diff[:, :, 0].std(), std, std / math.sqrt(2 * n))  # sd of a sample std ≈ σ/√(2n), plus rounding
    assert abs(diff.mean()) < 4 * std / math.sqrt(n)
    assert (diff[:, :, 0] == diff[:, :, 1]).all() and (diff[:, :, 1] == diff[:, :, 2]).all()
    assert out.dtype == np.uint8


def test_gaussian_clips_instead_of_wrapping():
    out = gaussian_noise(gray(value=5), 100.0, np.random.default_rng(1))
    assert (out == 0).mean() > 0.3  # half the noise is negative: clipped to 0, not wrapped to ~250
    assert (out > 200).mean() < 0.2
    out = gaussian_noise(gray(value=250), 100.0, np.random.default_rng(1))
    assert (out == 255).mean() > 0.3


def test_qmf_compat_field_is_fixed_and_wraps():
    a, b = gray(value=0), gray(value=60)
    na, nb = qmf_gaussian_noise(a, 50.0), qmf_gaussian_noise(b, 50.0)
    field = np.random.RandomState(0).normal(0, 50.0, size=(200, 200))
    # the same seed-0 field for every image: where no clipping happens the increments agree
    ok = (field > -60) & (field < 150)
    assert np.array_equal(nb[:, :, 0][ok].astype(int) - 60, np.trunc(field[ok] + 60).astype(int) - 60)
    # negative values wrap through the uint8 cast (QMF's quirk)
    neg = field < -1
    assert (na[:, :, 0][neg] > 150).mean() > 0.9
    assert np.array_equal(qmf_gaussian_noise(b, 50.0), nb)


@pytest.mark.parametrize("density", [0.1, 0.3])
def test_salt_pepper_fraction_halves_and_shared_mask(density):
    img = gray(300, 300)
    out = salt_pepper_noise(img, density, np.random.default_rng(2))
    n = 300 * 300
    salt = (out[:, :, 0] == 255).mean()
    pepper = (out[:, :, 0] == 0).mean()
    sd = math.sqrt(density / 2 * (1 - density / 2) / n)
    assert within(salt, density / 2, sd) and within(pepper, density / 2, sd)
    assert (out[:, :, 0] == out[:, :, 1]).all() and (out[:, :, 1] == out[:, :, 2]).all()
    untouched = (out[:, :, 0] != 0) & (out[:, :, 0] != 255)
    assert (out[untouched] == 128).all()


def test_primitives_accept_single_channel_and_reject_floats():
    img = np.full((50, 40), 100, dtype=np.uint8)
    assert gaussian_noise(img, 5.0, np.random.default_rng(0)).shape == (50, 40)
    assert salt_pepper_noise(img, 0.1, np.random.default_rng(0)).shape == (50, 40)
    assert qmf_gaussian_noise(img, 5.0).shape == (50, 40)
    with pytest.raises(ValueError):
        gaussian_noise(img.astype(np.float32), 5.0, np.random.default_rng(0))


@pytest.mark.parametrize("p_word", [0.1, 0.5, 1.0])
def test_text_replacement_rate(p_word):
    words = [f"w{i}" for i in range(4000)]
    out = text_noise(" ".join(words), p_word, np.random.default_rng(3)).split(" ")
    assert len(out) == len(words)
    replaced = np.mean([o == "_" for o in out])
    assert within(replaced, p_word, math.sqrt(p_word * (1 - p_word) / len(words)) + 1e-9)
    assert all(o in ("_", w) for o, w in zip(out, words))


def test_spectrogram_noise_is_relative_to_its_spread():
    spec = np.random.default_rng(0).normal(3.0, 2.0, size=(257, 188)).astype(np.float32)
    out = spectrogram_gaussian_noise(spec, 0.5, np.random.default_rng(1))
    n = spec.size
    assert within((out - spec).std(), 0.5 * spec.std(), 0.5 * spec.std() / math.sqrt(2 * n))
    sp = spectrogram_salt_pepper_noise(spec, 0.2, np.random.default_rng(1))
    assert within((sp == spec.max()).mean(), 0.1, math.sqrt(0.09 / n))
    assert within((sp == spec.min()).mean(), 0.1, math.sqrt(0.09 / n))


# ---------------------------------------------------------------- mapping NoiseConfig → Attack


def attack(dataset="mvsa_single", split="test", **noise):
    return Attack.from_config(NoiseConfig(**noise), dataset, split)


def applied_fraction(a: Attack, modality: str, n: int = 4000) -> float:
    img = gray(8, 8)
    return np.mean([not np.array_equal(a.image(img, modality, i), img) for i in range(n)])


def test_mvsa_gaussian_mapping():
    a = attack(kind="gaussian", eps=5)
    assert a.image_std == 50.0 and a.p_image == 0.5
    assert a.modalities == ("image", "text") and a.p_word == 0.5 and a.p_text == 0.5
    assert within(applied_fraction(a, "image"), 0.5, math.sqrt(0.25 / 4000))


@pytest.mark.parametrize("legacy,expected", [(False, 0.05), (True, 0.5)])
def test_mvsa_salt_pepper_p_apply(legacy, expected):
    a = attack(kind="salt_pepper", eps=10, legacy=legacy)
    assert a.p_image == pytest.approx(expected)
    assert within(applied_fraction(a, "image"), expected, math.sqrt(expected * (1 - expected) / 4000))


def test_nyud2_scale_and_independent_modalities():
    a = attack("nyud2", kind="gaussian", eps=10)
    assert a.image_std == 10.0 and a.modalities == ("rgb", "depth")
    img = gray(8, 8)
    rgb = np.array([not np.array_equal(a.image(img, "rgb", i), img) for i in range(4000)])
    depth = np.array([not np.array_equal(a.image(img, "depth", i), img) for i in range(4000)])
    assert within(rgb.mean(), 0.5, 0.008) and within(depth.mean(), 0.5, 0.008)
    assert within((rgb & depth).mean(), 0.25, math.sqrt(0.25 * 0.75 / 4000))  # independent draws
    assert attack("nyud2", kind="gaussian", eps=10, std_scale=10).image_std == 100.0


def test_text_sample_probability_and_word_rate():
    a = attack(kind="salt_pepper", eps=5)
    text = " ".join(["word"] * 40)
    outs = [a.text(text, "text", i) for i in range(2000)]
    attacked = np.mean([o != text for o in outs])
    assert within(attacked, 0.5, math.sqrt(0.25 / 2000))
    words = [w for o in outs if o != text for w in o.split(" ")]
    assert within(np.mean([w == "_" for w in words]), 0.5, math.sqrt(0.25 / len(words)))
    assert attack(kind="gaussian", eps=5, text=False).modalities == ("image",)


def test_same_seed_same_noise_other_seed_other_noise():
    img = gray(16, 16)
    a1, a2, b = attack(kind="gaussian", eps=5, seed=7), attack(kind="gaussian", eps=5, seed=7), \
        attack(kind="gaussian", eps=5, seed=8)
    outs1 = [a1.image(img, "image", i) for i in range(20)]
    outs2 = [a2.image(img, "image", i) for i in reversed(range(20))][::-1]  # order does not matter
    assert all(np.array_equal(x, y) for x, y in zip(outs1, outs2))
    outsb = [b.image(img, "image", i) for i in range(20)]
    assert not all(np.array_equal(x, y) for x, y in zip(outs1, outsb))
    # different samples get different fields (unlike QMF)
    attacked = [o for o in outs1 if not np.array_equal(o, img)]
    assert len(attacked) >= 2 and not np.array_equal(attacked[0], attacked[1])


def test_qmf_compat_uses_one_field_for_every_sample():
    a = attack(kind="gaussian", eps=5, qmf_compat=True, p_apply=1.0)
    img = gray(16, 16)
    outs = [a.image(img, "image", i) for i in range(5)]
    assert all(np.array_equal(outs[0], o) for o in outs)
    assert np.array_equal(outs[0], qmf_gaussian_noise(img, 50.0))


def test_modes_decide_which_splits_are_noisy():
    test_only = split_attacks(NoiseConfig(kind="gaussian", eps=5, mode="test"), "cremad")
    assert [test_only[s].active for s in ("train", "val", "test")] == [False, False, True]
    both = split_attacks(NoiseConfig(kind="gaussian", eps=5, mode="train+test"), "cremad")
    assert [both[s].active for s in ("train", "val", "test")] == [True, True, True]
    clean = split_attacks(NoiseConfig(), "cremad")
    assert not any(a.active for a in clean.values())
    img = gray(8, 8)
    assert all(test_only["train"].image(img, "visual", i) is img for i in range(50))
    # splits draw independent noise for the same index
    tr, te = both["train"], both["test"]
    assert any(not np.array_equal(tr.image(img, "visual", i), te.image(img, "visual", i)) for i in range(10))


def test_av_frames_attacked_together_with_fresh_noise_per_frame():
    a = attack("ks", kind="gaussian", eps=3, p_apply=1.0)
    frames = [gray(8, 8) for _ in range(3)]
    out = a.frames(frames, "visual", 0)
    assert all(not np.array_equal(o, f) for o, f in zip(out, frames))
    assert not np.array_equal(out[0], out[1])
    assert a.image_std == 30.0 and a.audio_rel_std == pytest.approx(0.3)
    spec = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
    assert not np.array_equal(a.spectrogram(spec, "audio", 0), spec)
    assert a.describe()["spectrograms"]["std_relative"] == pytest.approx(0.3)


def test_unknown_modality_or_dataset_is_a_config_error():
    with pytest.raises(ConfigError, match="noise.modalities"):
        attack("nyud2", kind="gaussian", eps=5, modalities=["image"])
    with pytest.raises(ConfigError, match="noise profile"):
        attack("nope", kind="gaussian", eps=5)
    assert attack("nyud2", kind="gaussian", eps=5, modalities=["depth"]).modalities == ("depth",)

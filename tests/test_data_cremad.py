"""CREMA-D loader (OGM-GE layout): shapes, labels, splits, frames, spectrogram, errors, cache, noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calray.data import build_datasets
from calray.data.base import dataset_labels
from calray.data.media import IMAGENET_MEAN, IMAGENET_STD, SpectrogramSettings, ogm_spectrogram
from calray.errors import ConfigError, DatasetError
from tests.fixtures_data import CREMAD_CLASSES, frame_color, make_cremad, run_config, write_wav

SMALL = {"frames": 2, "image_size": 16}


@pytest.fixture
def cremad(tmp_path):
    root = tmp_path / "CREMA-D"
    make_cremad(root)
    return root


def build(root, params=None, **kw):
    return build_datasets(run_config("cremad", root, {**SMALL, **(params or {})}, **kw))


def mean_color(frame: torch.Tensor) -> np.ndarray:
    """Undo the ImageNet normalisation of a 3×H×W frame and return its mean RGB on 0–255."""
    m = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    s = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((frame * s + m) * 255).mean(dim=(1, 2)).numpy()


def test_shapes_labels_and_splits(cremad):
    splits = build(cremad)
    assert splits.num_classes == 6 and splits.class_names == CREMAD_CLASSES
    assert splits.modalities == ["audio", "visual"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 6, 6)
    x, y = splits.test[0]
    assert x["audio"].shape == (1, 257, 188) and x["audio"].dtype == torch.float32
    assert x["visual"].shape == (2, 3, 16, 16)
    assert dataset_labels(splits.test) == [0, 1, 2, 3, 4, 5]  # NEU0 HAP1 SAD2 FEA3 DIS4 ANG5
    info = splits.info
    assert info["frames_per_clip"] == 2
    assert info["sizes"] == {"train": 12, "val": 6, "test": 6}
    assert info["class_counts"]["val"] == {c: 1 for c in CREMAD_CLASSES}
    x, y = splits.train[0]
    assert x["visual"].shape == (2, 3, 16, 16)


def test_derived_val_is_stratified_deterministic_and_disjoint(cremad):
    a, b = build(cremad), build(cremad)
    assert a.info["val_indices"] == b.info["val_indices"]
    assert set(a.train.indices).isdisjoint(a.val.indices)
    assert sorted(a.train.indices + a.val.indices) == list(range(18))
    c = build(cremad, seed=1)
    assert c.info["val_indices"] != a.info["val_indices"]
    # val reads the training clips without augmentation: the same item twice is identical
    x1, _ = a.val[0]
    x2, _ = a.val[0]
    assert torch.equal(x1["visual"], x2["visual"])


def test_evaluation_uses_the_segment_centre_frames(cremad):
    splits = build(cremad)  # 4 frames per clip, T = 2: segments {0,1} and {2,3}, centres 1 and 3
    x, _ = splits.test[0]
    for t, k in enumerate([1, 3]):
        assert np.abs(mean_color(x["visual"][t]) - frame_color(k)).max() < 8


def test_training_samples_one_frame_per_segment_in_order(cremad):
    splits = build(cremad)
    torch.manual_seed(0)
    seen = [set(), set()]
    for _ in range(12):
        x, _ = splits.train[0]
        for t in range(2):
            colors = [np.abs(mean_color(x["visual"][t]) - frame_color(k)).max() for k in range(4)]
            seen[t].add(int(np.argmin(colors)))
    assert seen[0] == {0, 1} and seen[1] == {2, 3}


def test_more_frames_than_available_repeats_and_is_logged(cremad):
    splits = build(cremad, {"frames": 6})
    x, _ = splits.test[0]
    assert x["visual"].shape[0] == 6
    assert splits.info["clips_with_fewer_frames_than_T"]["test"] == 6


def test_spectrogram_of_a_three_second_clip(tmp_path):
    path = tmp_path / "clip.wav"
    write_wav(path, seconds=3.0, sr=16000)
    from calray.data.media import read_wav

    samples, sr = read_wav(path, None)
    spec = ogm_spectrogram(samples, sr, SpectrogramSettings())
    assert spec.shape == (257, 188) == SpectrogramSettings().shape()
    # short clips are tiled to 3 s, so every clip has the same shape
    write_wav(tmp_path / "short.wav", seconds=0.4)
    assert ogm_spectrogram(*read_wav(tmp_path / "short.wav", None), SpectrogramSettings()).shape == (257, 188)


def test_spectrogram_matches_scipy_stft_and_analytic_peak():
    from scipy.signal import get_window, stft

    s = SpectrogramSettings()
    sr = s.sample_rate
    k = 40  # a bin-centred sine: periodic-Hann peak magnitude = amplitude · n_fft / 4
    t = np.arange(sr * 3) / sr
    y = 0.5 * np.sin(2 * np.pi * k * sr / s.n_fft * t)
    spec = ogm_spectrogram(y.astype(np.float32), sr, s)
    _, _, z = stft(y, fs=sr, window="hann", nperseg=s.n_fft, noverlap=s.n_fft - s.hop, boundary="even",
                   padded=False)
    ref = np.log(np.abs(z) * get_window("hann", s.n_fft).sum() + 1e-7)
    assert ref.shape == spec.shape
    mag, ref_mag = np.exp(spec), np.exp(ref)  # compare magnitudes: log of ~0 bins only shows float32 rounding
    np.testing.assert_allclose(mag, ref_mag, atol=1e-4 * ref_mag.max())
    assert np.argmax(spec[:, 90]) == k
    assert spec[k, 90] == pytest.approx(np.log(0.5 * s.n_fft / 4), abs=1e-3)


def test_missing_root_names_the_preparation_script(tmp_path):
    with pytest.raises(DatasetError, match="prepare_cremad.py"):
        build(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="data.root"):
        build_datasets(run_config("cremad", "", SMALL))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="train.csv"):
        build(tmp_path / "empty")


def test_missing_files_are_an_error_or_counted(cremad):
    clip = (cremad / "train.csv").read_text().splitlines()[4].split(",")[0]
    (cremad / "AudioWAV" / f"{clip}.wav").unlink()
    with pytest.raises(DatasetError, match=f"{clip}.wav"):
        build(cremad)
    with pytest.warns(UserWarning, match="skipped 1"):
        splits = build(cremad, {"on_missing": "skip"})
    assert splits.info["skipped"]["train"]["count"] == 1
    assert splits.info["sizes"]["train"] + splits.info["sizes"]["val"] == 17


def test_corrupt_frame_and_unreadable_wav(cremad):
    clip = (cremad / "test.csv").read_text().splitlines()[0].split(",")[0]
    (cremad / "Image-01-FPS" / clip / "frame_00002.jpg").write_bytes(b"not a jpeg")
    splits = build(cremad)
    with pytest.raises(DatasetError, match="frame_00002.jpg"):
        splits.test[0]
    (cremad / "AudioWAV" / f"{clip}.wav").write_bytes(b"RIFF garbage")
    with pytest.raises(DatasetError, match=f"cannot read audio.*{clip}.wav"):
        build(cremad).test[0]


def test_unknown_emotion_and_unknown_param(cremad):
    with open(cremad / "test.csv", "a") as f:
        f.write("9999_XXX_BOR_XX,BOR\n")
    with pytest.raises(DatasetError, match="line 7: unknown emotion 'BOR'"):
        build(cremad)
    with pytest.raises(ConfigError, match="data.params.fps"):
        build(cremad, {"fps": 1})


def test_stored_spectrograms_and_shape_check(cremad):
    rows = [line.split(",")[0] for n in ("train.csv", "test.csv") for line in (cremad / n).read_text().splitlines()]
    for clip in rows:
        (cremad / "audio_spec").mkdir(exist_ok=True)
        np.save(cremad / "audio_spec" / f"{clip}.npy", np.zeros((257, 40), np.float32))
    splits = build(cremad, {"audio": "spec"})
    assert splits.test[0][0]["audio"].shape == (1, 257, 40)
    np.save(cremad / "audio_spec" / f"{rows[-1]}.npy", np.zeros((257, 41), np.float32))
    with pytest.raises(DatasetError, match="shape"):
        build(cremad, {"audio": "spec"}).test[5]


def test_one_modality_reads_only_that_one(cremad):
    splits = build(cremad, modalities=["audio"])
    assert splits.modalities == ["audio"]
    assert set(splits.test[0][0]) == {"audio"}


def test_cache_decodes_once_and_matches(cremad, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    plain = build(cremad)
    cached = build(cremad, {"cache_frames": True}, cache_dir=str(cache))
    x0, _ = plain.test[1]
    x1, _ = cached.test[1]
    assert torch.equal(x0["audio"], x1["audio"])
    assert torch.equal(x0["visual"], x1["visual"])  # eval frames are cached at their final size: exact
    assert any(cache.rglob("spectrogram.npy")) and any(cache.rglob("frames.npy"))

    import calray.data.audiovisual as av

    def boom(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(av, "read_wav", boom)
    monkeypatch.setattr(av, "open_image", boom)
    again = build(cremad, {"cache_frames": True}, cache_dir=str(cache))  # a later trial
    x2, _ = again.test[1]
    assert torch.equal(x1["audio"], x2["audio"]) and torch.equal(x1["visual"], x2["visual"])
    # another setting is another cache, never a stale one
    with pytest.raises(AssertionError, match="decoded again"):
        build(cremad, {"image_size": 8, "cache_frames": True}, cache_dir=str(cache)).test[1]


def test_noise_on_test_only_and_reproducible(cremad):
    noise = {"kind": "gaussian", "eps": 5, "p_apply": 1.0, "seed": 3}
    clean = build(cremad)
    noisy = build(cremad, noise=noise)
    again = build(cremad, noise=noise)
    xc, xn, xa = clean.test[2][0], noisy.test[2][0], again.test[2][0]
    assert not torch.equal(xc["visual"], xn["visual"]) and not torch.equal(xc["audio"], xn["audio"])
    assert torch.equal(xn["visual"], xa["visual"]) and torch.equal(xn["audio"], xa["audio"])
    assert torch.equal(clean.val[0][0]["visual"], noisy.val[0][0]["visual"])  # mode test: val clean
    torch.manual_seed(0)
    tc = clean.train[0][0]
    torch.manual_seed(0)
    tn = noisy.train[0][0]
    assert torch.equal(tc["visual"], tn["visual"]) and torch.equal(tc["audio"], tn["audio"])
    assert noisy.info["noise"]["train"]["active"] is False and noisy.info["noise"]["test"]["active"] is True
    both = build(cremad, noise={**noise, "mode": "train+test"})
    assert not torch.equal(clean.val[0][0]["audio"], both.val[0][0]["audio"])

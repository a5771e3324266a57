"""scripts/prepare_*.py against the real tools: a real ffmpeg (imageio-ffmpeg's static binary) on
tiny videos made with ffmpeg's lavfi sources, and a real HDF5 file laid out like MATLAB v7.3's
`nyu_depth_v2_labeled.mat`, read with h5py. test_data_prepare.py covers the same scripts with a
stand-in ffmpeg and in-memory NYUD2 arrays; these check the actual ffmpeg command lines and the
actual HDF5 reading. h5py and imageio-ffmpeg are in the `dev` extra, so these run in CI.
"""

from __future__ import annotations

import importlib
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import soundfile as sf
from PIL import Image

from calray.data import build_datasets
from tests.fixtures_data import run_config
from tests.test_data_prepare import SCRIPTS

SECONDS, RATE, SIZE = 3, 10, (160, 120)  # every test video: 3 s at 10 fps, 160×120, a stereo sine
HZ_PER_BIN = 22050 / 512  # both spectrogram recipes: 22,050 Hz audio, 512-point frames


@pytest.fixture(scope="module")
def scripts():
    sys.path.insert(0, str(SCRIPTS))
    try:
        yield {name: importlib.import_module(f"prepare_{name}") for name in ("cremad", "ks", "ave", "nyud2")}
    finally:
        sys.path.remove(str(SCRIPTS))


@pytest.fixture(scope="module")
def ffmpeg_exe():
    imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
    return imageio_ffmpeg.get_ffmpeg_exe()


@pytest.fixture(scope="module")
def make_video(ffmpeg_exe, tmp_path_factory):
    """make_video(path, freq): a 3-s clip whose red channel rises with time (40 + 60·t) and whose
    audio is a `freq` Hz sine (44.1 kHz stereo); .flv as CREMA-D ships (Sorenson Spark + MP3),
    else H.264 + AAC. Made once per (suffix, freq) and copied."""
    cache_dir, made = tmp_path_factory.mktemp("videos"), {}

    def make(path: Path, freq: float = 440.0) -> Path:
        key = (path.suffix, freq)
        if key not in made:
            src = cache_dir / f"{int(freq)}{path.suffix}"
            codecs = (["-c:v", "flv", "-q:v", "3", "-c:a", "libmp3lame"] if path.suffix == ".flv"
                      else ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac"])
            video = (f"color=c=black:size={SIZE[0]}x{SIZE[1]}:rate={RATE}:duration={SECONDS},"
                     "format=rgb24,geq=r='40+T*60':g=128:b=64")
            subprocess.run([ffmpeg_exe, "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i", video,
                            "-f", "lavfi", "-i", f"sine=frequency={freq}:sample_rate=44100:duration={SECONDS}",
                            "-ac", "2", *codecs, "-shortest", str(src)], check=True, capture_output=True)
            made[key] = src
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(made[key], path)
        return path

    return make


def check_frames(directory: Path, count: int, fps: float) -> None:
    """`count` decodable 160×120 JPEGs frame_00001.jpg …, in time order, `1/fps` s apart."""
    frames = sorted(directory.iterdir())
    assert [f.name for f in frames] == [f"frame_{k:05d}.jpg" for k in range(1, count + 1)]
    reds = []
    for f in frames:
        with Image.open(f) as img:
            assert img.format == "JPEG" and img.size == SIZE
            reds.append(np.asarray(img.convert("RGB"), dtype=float)[..., 0].mean())
    # the source's red rises 60 per second: consecutive frames differ by 60/fps
    assert np.allclose(np.diff(reds), 60 / fps, atol=6), reds


def peak_bin(spec: np.ndarray) -> int:
    return int(np.argmax(spec.mean(axis=1)))


def record_wavs(monkeypatch) -> list:
    """Wrap calray.data.media.read_wav (the scripts import it per clip) to see each temporary wav
    ffmpeg wrote: (rate, channels, frames) as stored, and the samples the script went on with."""
    import calray.data.media as media

    seen, original = [], media.read_wav

    def read_wav(path, script):
        info = sf.info(str(path))
        samples, sr = original(path, script)
        seen.append((info.samplerate, info.channels, info.frames, samples, sr))  # list.append: thread-safe
        return samples, sr

    monkeypatch.setattr(media, "read_wav", read_wav)
    return seen


# ---------------------------------------------------------------- ffmpeg


def test_real_ffmpeg_cremad(scripts, ffmpeg_exe, make_video, tmp_path, capsys):
    """CREMA-D: AudioWAV/*.wav (16 kHz mono, as released) + VideoFlash/*.flv → frames, spectrograms,
    lists; the loader reads the result with stored and with computed spectrograms alike."""
    raw, out = tmp_path / "CREMA-D", tmp_path / "prepared"
    clips = {"1001_DFA_ANG_XX": 440.0, "1002_DFA_HAP_XX": 880.0, "1003_IEO_ANG_HI": 1320.0, "1004_IEO_HAP_HI": 660.0}
    (raw / "AudioWAV").mkdir(parents=True)
    for clip, freq in clips.items():
        video, wav = make_video(raw / "VideoFlash" / f"{clip}.flv", freq), raw / "AudioWAV" / f"{clip}.wav"
        subprocess.run([ffmpeg_exe, "-nostdin", "-loglevel", "error", "-y", "-i", str(video), "-vn", "-ac", "1",
                        "-ar", "16000", "-c:a", "pcm_s16le", str(wav)], check=True, capture_output=True)
    assert scripts["cremad"].main(["--raw", str(raw), "--out", str(out), "--ffmpeg", ffmpeg_exe, "--fps", "2",
                                   "--spectrograms", "--test-fraction", "0.5", "--jobs", "2"]) == 0
    assert "failed" not in capsys.readouterr().err
    for clip, freq in clips.items():
        check_frames(out / "Image-02-FPS" / clip, 2 * SECONDS, fps=2)
        spec = np.load(out / "audio_spec" / f"{clip}.npy")
        assert spec.shape == (257, 188) and spec.dtype == np.float32
        assert abs(peak_bin(spec) - freq / HZ_PER_BIN) <= 1
    test = (out / "test.csv").read_text().splitlines()
    assert len(test) == 2 and {row.split(",")[1] for row in test} == {"ANG", "HAP"}
    loaded = {audio: build_datasets(run_config("cremad", out, {"frames": 3, "image_size": 16, "audio": audio,
                                                               "visual_dir": "Image-02-FPS"}))
              for audio in ("wav", "spec")}
    for audio, splits in loaded.items():
        assert len(splits.test) == 2
        inputs, label = splits.test[0]
        assert inputs["audio"].shape == (1, 257, 188) and inputs["visual"].shape == (3, 3, 16, 16)
    # the stored spectrogram is the one the loader computes from the wav
    assert np.allclose(loaded["wav"].test[0][0]["audio"], loaded["spec"].test[0][0]["audio"], atol=1e-4)


def test_real_ffmpeg_ks(scripts, ffmpeg_exe, make_video, tmp_path, monkeypatch):
    """Kinetics-Sounds: <split>/<class>/<id>.mp4 → at most --max-frames frames, a 22,050 Hz mono wav
    (stereo source) → 257×1004 pkl; a video ffmpeg cannot read is reported and left out."""
    raw, out = tmp_path / "ks_raw", tmp_path / "KineticSound"
    freqs = {}
    for split, n in (("train", 2), ("test", 1)):
        for c, cls in enumerate(("playing_bass guitar", "tapping pen")):
            for k in range(n):
                clip_id = f"{cls[:3]}{split}{k}_000001_000004"
                freqs[clip_id] = 440.0 * (1 + c)
                make_video(raw / split / cls / f"{clip_id}.mp4", freqs[clip_id])
    (raw / "train" / "tapping pen" / "broken_000001_000004.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video")
    wavs = record_wavs(monkeypatch)
    assert scripts["ks"].main(["--raw", str(raw), "--out", str(out), "--ffmpeg", ffmpeg_exe, "--fps", "2",
                               "--max-frames", "5", "--jobs", "2"]) == 0
    assert (out / "failed.txt").read_text() == "broken_000001_000004\n"
    assert "broken" not in (out / "my_train.txt").read_text()
    assert (out / "stat.txt").read_text() == "playing bass guitar\ntapping pen\n"
    assert len(wavs) == len(freqs)  # one wav per readable clip
    for rate, channels, frames, samples, sr in wavs:
        assert (rate, channels, sr) == (22050, 1, 22050) and abs(frames / rate - SECONDS) < 0.1
    from _prep_common import ogm_av_spectrogram

    stored = {}
    for clip_id, freq in freqs.items():
        check_frames(out / "visual" / clip_id, 5, fps=2)  # 2 fps × 3 s = 6, capped at 5
        stored[clip_id] = pickle.loads((out / "audio_spec" / f"{clip_id}.pkl").read_bytes())
        assert stored[clip_id].shape == (257, 1004) and stored[clip_id].dtype == np.float32
        assert abs(peak_bin(stored[clip_id]) - freq / HZ_PER_BIN) <= 1
    # each pkl is OGM-GE's spectrogram of one of the wavs ffmpeg wrote
    recomputed = [ogm_av_spectrogram(samples, sr) for *_, samples, sr in wavs]
    assert all(any(np.array_equal(s, r) for r in recomputed) for s in stored.values())
    splits = build_datasets(run_config("ks", out, {"frames": 2, "image_size": 16}))
    assert splits.num_classes == 2 and len(splits.test) == 2
    inputs, _ = splits.test[0]
    assert inputs["audio"].shape == (1, 257, 1004) and inputs["visual"].shape == (2, 3, 16, 16)


def test_real_ffmpeg_ave(scripts, ffmpeg_exe, make_video, tmp_path, monkeypatch):
    """AVE: AVE/<ytid>.mp4 + the three lists → 1-fps frames (3 for a 3-s clip, under --max-frames 10),
    257×1004 spectrograms; the loader reads every split."""
    raw, out = tmp_path / "AVE_Dataset", tmp_path / "AVE"
    rows = {"trainSet.txt": ["Church bell&aaa&good&0&3", "Dog&bbb&good&0&3", "Church bell&fff&good&0&3",
                             "Dog&ggg&good&0&3"],
            "valSet.txt": ["Church bell&ccc&good&0&3", "Dog&ddd&good&0&3"],
            "testSet.txt": ["Dog&eee&good&0&3"]}
    raw.mkdir()
    for name, lines in rows.items():
        (raw / name).write_text("Category&VideoID&Quality&StartTime&EndTime\n" + "\n".join(lines) + "\n")
    freqs = {}
    for lines in rows.values():
        for line in lines:
            cls, vid = line.split("&")[:2]
            freqs[vid] = 440.0 if cls == "Dog" else 1320.0
            make_video(raw / "AVE" / f"{vid}.mp4", freqs[vid])
    wavs = record_wavs(monkeypatch)
    assert scripts["ave"].main(["--raw", str(raw), "--out", str(out), "--ffmpeg", ffmpeg_exe, "--jobs", "2"]) == 0
    assert not (out / "failed.txt").exists()
    assert len(wavs) == len(freqs)
    for rate, channels, frames, _, _ in wavs:
        assert (rate, channels) == (22050, 1) and abs(frames / rate - SECONDS) < 0.1
    for vid, freq in freqs.items():
        check_frames(out / "visual" / vid, SECONDS, fps=1)
        spec = pickle.loads((out / "audio_spec" / f"{vid}.pkl").read_bytes())
        assert spec.shape == (257, 1004) and abs(peak_bin(spec) - freq / HZ_PER_BIN) <= 1
    splits = build_datasets(run_config("ave", out, {"frames": 2, "image_size": 16}))
    assert splits.class_names == ["Church bell", "Dog"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (4, 2, 1)
    inputs, label = splits.test[0]
    assert label == 1 and inputs["audio"].shape == (1, 257, 1004) and inputs["visual"].shape == (2, 3, 16, 16)


# ---------------------------------------------------------------- NYUD2 from a MATLAB v7.3 file


def write_matlab73_labeled(path: Path, images: np.ndarray, depths: np.ndarray, scenes: list[str]) -> None:
    """nyu_depth_v2_labeled.mat as MATLAB -v7.3 writes it: an HDF5 file behind a 512-byte MAT header,
    every array stored with its dimensions reversed (column-major) — `images` H×W×3×N uint8 as
    N×3×W×H, `depths` H×W×N single as N×W×H — and the N×1 cell `sceneTypes` as a 1×N dataset of
    object references to 1×L char arrays (uint16, stored L×1) in the `#refs#` group."""
    h5py = pytest.importorskip("h5py")
    n = len(scenes)
    with h5py.File(path, "w", userblock_size=512) as f:
        img = f.create_dataset("images", data=np.transpose(images, (0, 3, 2, 1)))  # N×H×W×3 → N×3×W×H
        img.attrs["MATLAB_class"] = np.bytes_("uint8")
        dep = f.create_dataset("depths", data=np.transpose(depths, (0, 2, 1)).astype(np.float32))  # N×H×W → N×W×H
        dep.attrs["MATLAB_class"] = np.bytes_("single")
        refs = f.create_group("#refs#")
        cell = f.create_dataset("sceneTypes", shape=(1, n), dtype=h5py.ref_dtype)
        cell.attrs["MATLAB_class"] = np.bytes_("cell")
        for i, scene in enumerate(scenes):
            chars = refs.create_dataset(f"s{i}", data=np.array([[ord(c)] for c in scene], dtype=np.uint16))
            chars.attrs["MATLAB_class"] = np.bytes_("char")
            chars.attrs["MATLAB_int_decode"] = np.int32(2)
            cell[0, i] = chars.ref
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    with open(path, "r+b") as f:
        f.write(header.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM")


def test_real_hdf5_nyud2(scripts, tmp_path, capsys):
    """prepare_nyud2.py on a MATLAB v7.3 file: each PNG is the H×W×3 image (left, the transposes
    undone exactly) beside the depth grey (right), in its scene's class folder, named by 1-based index."""
    h, w, n = 6, 10, 6  # H ≠ W and random pixels: any wrong transpose changes the PNG
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)
    depths = rng.uniform(0.0, 12.0, size=(n, h, w)).astype(np.float32)  # some beyond --max-depth 10
    scenes = ["kitchen", "living_room", "basement", "home_office", "kitchen", "living_room"]
    labeled, splits = tmp_path / "nyu_depth_v2_labeled.mat", tmp_path / "splits.mat"
    write_matlab73_labeled(labeled, images, depths, scenes)
    scipy.io.savemat(splits, {"trainNdxs": np.array([[1], [2], [3], [4]]), "testNdxs": np.array([[5], [6]])})
    assert labeled.read_bytes().startswith(b"MATLAB 7.3 MAT-file")

    got_images, got_depths, got_scenes = scripts["nyud2"].load_labeled(labeled)
    assert got_scenes == scenes
    assert np.array_equal(got_images[3], images[3]) and np.array_equal(got_depths[3], depths[3])

    out = tmp_path / "nyud2"
    assert scripts["nyud2"].main(["--labeled", str(labeled), "--splits", str(splits), "--out", str(out)]) == 0
    assert "counts per split and class" in capsys.readouterr().out
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert written == ["test/kitchen/0005.png", "test/living_room/0006.png", "train/home_office/0004.png",
                       "train/kitchen/0001.png", "train/living_room/0002.png", "train/others/0003.png"]
    for rel in written:
        i = int(Path(rel).stem) - 1
        pair = np.asarray(Image.open(out / rel))
        assert pair.shape == (h, 2 * w, 3) and pair.dtype == np.uint8
        assert np.array_equal(pair[:, :w], images[i])
        grey = np.clip(np.rint(depths[i] / 10.0 * 255.0), 0, 255).astype(np.uint8)
        assert np.array_equal(pair[:, w:], np.repeat(grey[:, :, None], 3, axis=2))
    assert (pair[:, w:] == 255).any()  # depths beyond 10 m saturate

    loaded = build_datasets(run_config("nyud2", out, {"image_size": 8, "load_size": 8}, val_fraction=0.5))
    assert loaded.class_names == ["home_office", "kitchen", "living_room", "others"] and len(loaded.test) == 2
    assert loaded.test[1][1] == 2  # test/living_room/0006.png


def test_real_hdf5_nyud2_missing_files(scripts, tmp_path):
    pytest.importorskip("h5py")
    labeled, splits = tmp_path / "nyu_depth_v2_labeled.mat", tmp_path / "splits.mat"
    args = ["--labeled", str(labeled), "--splits", str(splits), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match=f"error: {splits} not found"):
        scripts["nyud2"].main(args)
    scipy.io.savemat(splits, {"trainNdxs": np.array([[1]]), "testNdxs": np.array([[2]])})
    with pytest.raises(SystemExit, match=f"error: {labeled} not found"):
        scripts["nyud2"].main(args)
    assert not (tmp_path / "out").exists()

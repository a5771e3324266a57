"""scripts/prepare_*.py: raw-release fixtures → the layouts, which the loaders then read.

ffmpeg is replaced by a small stand-in script that writes frames and wavs the way ffmpeg would.
"""

from __future__ import annotations

import importlib
import json
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from calray.data import build_datasets
from tests.fixtures_data import run_config, write_image, write_wav

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

FAKE_FFMPEG = r"""#!/bin/sh
# Stand-in for ffmpeg: `... -i IN ... OUT` copies 3 template frames for an OUT with %05d, else a template wav.
dir=$(dirname "$0"); src=""; out=""; prev=""
for a in "$@"; do [ "$prev" = "-i" ] && src="$a"; prev="$a"; out="$a"; done
[ -e "$src" ] || { echo "$src: No such file or directory" >&2; exit 1; }
case "$out" in
  *%05d*) for k in 00001 00002 00003; do cp "$dir/frame.jpg" "$(echo "$out" | sed "s/%05d/$k/")"; done ;;
  *) cp "$dir/audio.wav" "$out" ;;
esac
"""


@pytest.fixture(scope="module")
def scripts():
    sys.path.insert(0, str(SCRIPTS))
    try:
        yield {name: importlib.import_module(f"prepare_{name}") for name in ("cremad", "ks", "ave", "nyud2", "mvsa")}
    finally:
        sys.path.remove(str(SCRIPTS))


@pytest.fixture
def ffmpeg(tmp_path):
    path = tmp_path / "bin" / "ffmpeg"
    write_image(path.parent / "frame.jpg", (40, 90, 200), size=(24, 16))
    write_wav(path.parent / "audio.wav", seconds=1.0, sr=22050)
    path.write_text(FAKE_FFMPEG)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.mark.parametrize("name", ["cremad", "ks", "ave", "nyud2", "mvsa"])
def test_every_script_has_help(scripts, name, capsys):
    with pytest.raises(SystemExit) as e:
        scripts[name].main(["--help"])
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_missing_ffmpeg_is_one_clear_error(scripts, tmp_path):
    (tmp_path / "raw" / "AudioWAV").mkdir(parents=True)
    write_wav(tmp_path / "raw" / "AudioWAV" / "1001_DFA_ANG_XX.wav")
    with pytest.raises(SystemExit, match="ffmpeg not found.*--ffmpeg"):
        scripts["cremad"].main(["--raw", str(tmp_path / "raw"), "--ffmpeg", "no-such-ffmpeg-here"])


def test_prepare_cremad(scripts, ffmpeg, tmp_path, capsys):
    raw, out = tmp_path / "CREMA-D", tmp_path / "prepared"
    emotions = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]
    for k, emo in enumerate(emotions * 2):
        clip = f"{1001 + k}_IEO_{emo}_HI"
        write_wav(raw / "AudioWAV" / f"{clip}.wav", seconds=0.3)
        (raw / "VideoFlash").mkdir(exist_ok=True)
        (raw / "VideoFlash" / f"{clip}.flv").write_bytes(b"flv")
    (raw / "VideoFlash" / "1012_IEO_ANG_HI.flv").unlink()  # a clip without video
    assert scripts["cremad"].main(["--raw", str(raw), "--out", str(out), "--ffmpeg", ffmpeg, "--spectrograms",
                                   "--test-fraction", "0.34", "--jobs", "2"]) == 0
    printed = capsys.readouterr()
    assert "counts per split and class" in printed.out and "1 failed" in printed.err
    assert "differ from the full release" in printed.err  # 11 clips, not 7,442
    train = (out / "train.csv").read_text().splitlines()
    test = (out / "test.csv").read_text().splitlines()
    assert len(train) + len(test) == 11 and len(test) == 5  # the clip whose frames failed is left out
    assert sorted(f.name for f in (out / "Image-01-FPS" / "1001_IEO_NEU_HI").iterdir()) == \
        ["frame_00001.jpg", "frame_00002.jpg", "frame_00003.jpg"]
    assert np.load(out / "audio_spec" / "1001_IEO_NEU_HI.npy").shape == (257, 188)
    for audio in ("wav", "spec"):
        splits = build_datasets(run_config("cremad", out, {"frames": 2, "image_size": 16, "audio": audio}))
        assert len(splits.test) == 5 and splits.test[0][0]["audio"].shape == (1, 257, 188)


def test_prepare_cremad_reuses_ogm_lists(scripts, ffmpeg, tmp_path, capsys):
    raw, lists = tmp_path / "CREMA-D", tmp_path / "ogm"
    clips = [f"{1001 + k}_IEO_{e}_HI" for k, e in enumerate(["NEU", "HAP", "SAD", "FEA"])]
    for c in clips:
        write_wav(raw / "AudioWAV" / f"{c}.wav", seconds=0.2)
    lists.mkdir()
    (lists / "train.csv").write_text("".join(f"{c},{c.split('_')[2]}\n" for c in clips[:3]))
    (lists / "test.csv").write_text(f"{clips[3]},FEA\n")
    assert scripts["cremad"].main(["--raw", str(raw), "--splits", str(lists), "--skip-frames"]) == 0
    assert (raw / "test.csv").read_text() == f"{clips[3]},FEA\n"
    err = capsys.readouterr().err
    assert "train: 3 samples, expected 6698" in err and "test/FEA: 1, expected 133" in err


def test_prepare_ks(scripts, ffmpeg, tmp_path):
    raw, out = tmp_path / "ks_raw", tmp_path / "KineticSound"
    for split, n in (("train", 2), ("test", 1)):
        for cls in ("playing_bass guitar", "tapping pen"):
            for k in range(n):
                p = raw / split / cls / f"{cls[:3]}{split}{k}_000001_000011.mp4"
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(b"mp4")
    assert scripts["ks"].main(["--raw", str(raw), "--out", str(out), "--ffmpeg", ffmpeg, "--format", "npy"]) == 0
    assert (out / "stat.txt").read_text() == "playing bass guitar\ntapping pen\n"
    assert (out / "my_train.txt").read_text().splitlines()[0] == "playing bass guitar,platrain0_000001_000011"
    splits = build_datasets(run_config("ks", out, {"frames": 2, "image_size": 16}))
    assert splits.num_classes == 2 and len(splits.test) == 2
    assert splits.test[0][0]["audio"].shape == (1, 257, 1004)


def test_prepare_ave(scripts, ffmpeg, tmp_path, capsys):
    raw, out = tmp_path / "AVE_Dataset", tmp_path / "AVE"
    (raw / "AVE").mkdir(parents=True)
    rows = {"trainSet.txt": ["Church bell&aaa&good&0&10", "Male speech, man speaking&bbb&good&1&9",
                             "Church bell&ccc&bad&0&10", "Male speech, man speaking&aaa&good&2&5"],
            "valSet.txt": ["Church bell&ddd&good&0&10"],
            "testSet.txt": ["Male speech, man speaking&eee&good&0&10"]}
    for name, lines in rows.items():
        (raw / name).write_text("Category&VideoID&Quality&StartTime&EndTime\n" + "\n".join(lines) + "\n")
    for vid in "abcde":
        (raw / "AVE" / f"{vid * 3}.mp4").write_bytes(b"mp4")
    assert scripts["ave"].main(["--raw", str(raw), "--out", str(out), "--ffmpeg", ffmpeg]) == 0
    assert "train: 4 rows, 3 unique ids, 1 repeated" in capsys.readouterr().out
    assert (out / "stat.txt").read_text() == 'Church bell\n"Male speech, man speaking"\n'
    assert (out / "trainSet.txt").read_text().splitlines() == rows["trainSet.txt"]
    splits = build_datasets(run_config("ave", out, {"frames": 2, "image_size": 16}))
    assert splits.class_names == ["Church bell", "Male speech, man speaking"]
    assert len(splits.train) == 3 and splits.info["duplicates"]["train"]["repeated_ids"] == 1
    assert splits.train[0][0]["audio"].shape == (1, 257, 1004)


def test_prepare_nyud2_layout_and_splits(scripts, tmp_path):
    mod = scripts["nyud2"]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 12, 16, 3), dtype=np.uint8)
    depths = rng.uniform(0, 10, size=(5, 12, 16))
    scenes = ["kitchen", "bedroom", "basement", "kitchen", "bedroom"]
    scipy.io.savemat(tmp_path / "splits.mat", {"trainNdxs": np.array([[1], [2], [3]]), "testNdxs": np.array([[4], [5]])})
    splits = mod.load_splits(tmp_path / "splits.mat")
    counts = mod.write_layout(tmp_path / "nyud2", images, depths, scenes, splits, 10.0)
    assert counts["train"] == {"kitchen": 1, "bedroom": 1, "others": 1}
    from PIL import Image

    pair = np.asarray(Image.open(tmp_path / "nyud2" / "train" / "kitchen" / "0001.png"))
    assert pair.shape == (12, 32, 3)
    assert np.array_equal(pair[:, :16], images[0])
    assert np.abs(pair[:, 16:, 0].astype(float) - depths[0] / 10 * 255).max() <= 0.5
    assert (pair[:, 16:, 0] == pair[:, 16:, 2]).all()
    loaded = build_datasets(run_config("nyud2", tmp_path / "nyud2", {"image_size": 8, "load_size": 8},
                                       val_fraction=0.5))
    assert loaded.class_names == ["bedroom", "kitchen", "others"] and len(loaded.test) == 2


def write_mvsa_raw(raw: Path) -> dict[str, tuple[str, str]]:
    pairs = {}
    combos = [("positive", "positive")] * 5 + [("negative", "negative")] * 5 + [("neutral", "neutral")] * 5 + \
             [("neutral", "positive"), ("negative", "neutral"), ("positive", "negative"), ("negative", "positive")]
    for k, (t, i) in enumerate(combos, start=1):
        pairs[str(k)] = (t, i)
        write_image(raw / "data" / f"{k}.jpg", (10 * k, 50, 90))
        (raw / "data" / f"{k}.txt").write_bytes(f"tweet number {k} caf\xe9 ".encode("latin-1"))
    (raw / "labelResultAll.txt").write_text("ID\ttext,image\n" + "".join(f"{k}\t{t},{i}\n"
                                                                          for k, (t, i) in pairs.items()))
    return pairs


@pytest.mark.parametrize("policy,kept", [("agree", 15), ("xu", 17)])
def test_prepare_mvsa(scripts, tmp_path, policy, kept, capsys):
    raw, out = tmp_path / "MVSA_Single", tmp_path / "prepared"
    write_mvsa_raw(raw)
    assert scripts["mvsa"].main(["--raw", str(raw), "--out", str(out), "--policy", policy]) == 0
    assert f"{kept} tweets kept" in capsys.readouterr().out
    rows = {s: [json.loads(l) for l in (out / f"{s}.jsonl").read_text(encoding="utf-8").splitlines()]
            for s in ("train", "dev", "test")}
    assert sum(len(r) for r in rows.values()) == kept
    assert {r["id"] for rs in rows.values() for r in rs} >= {str(k) for k in range(1, 16)}
    row = next(r for r in rows["train"] if r["id"] == "1" or r["id"] in {"2", "3", "4", "5"})
    assert row["text"].startswith("tweet number") and row["text"].endswith("café") and row["img"].startswith("data/")
    if policy == "xu":
        labels = {r["id"]: r["label"] for rs in rows.values() for r in rs}
        assert labels["16"] == "positive" and labels["17"] == "negative" and "18" not in labels
    splits = build_datasets(run_config("mvsa_single", out, {"image_size": 16, "resize_size": 20},
                                       modalities=["image"]))
    assert len(splits.train) + len(splits.val) + len(splits.test) == kept

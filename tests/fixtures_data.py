"""Tiny datasets written in each benchmark's real on-disk layout (a handful of samples, tiny images)."""

from __future__ import annotations

import inspect
import json
import pickle
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

from calray.config import config_from_dict

CREMAD_CLASSES = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]


def frame_color(k: int) -> tuple[int, int, int]:
    """A colour that identifies frame k of a clip even after JPEG compression."""
    return (20 + 45 * k, 128, 255 - 45 * k)


def write_image(path: Path, color, size=(24, 18), noise: int = 0, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.empty((size[1], size[0], 3), dtype=np.uint8)
    arr[:] = color
    if noise:
        rng = np.random.default_rng(seed)
        arr = np.clip(arr.astype(int) + rng.integers(-noise, noise + 1, arr.shape), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(path)


def write_frames(directory: Path, n: int, size=(24, 18)) -> None:
    for k in range(n):
        write_image(directory / f"frame_{k + 1:05d}.jpg", frame_color(k), size)


def write_wav(path: Path, seconds: float = 0.5, sr: int = 16000, freq: float = 440.0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(sr * seconds)) / sr
    sf.write(str(path), (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr, subtype="PCM_16")


def make_cremad(root: Path, train_per_class: int = 3, test_per_class: int = 1, frames: int = 4,
                seconds: float = 0.5, classes=CREMAD_CLASSES) -> dict:
    """OGM-GE CREMA-D: train.csv/test.csv, Image-01-FPS/<clip>/, AudioWAV/<clip>.wav."""
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    n = 0
    for split, per in (("train", train_per_class), ("test", test_per_class)):
        rows = []
        for emo in classes:
            for _ in range(per):
                clip = f"{1001 + n}_DFA_{emo}_XX"
                n += 1
                rows.append(f"{clip},{emo}")
                write_frames(root / "Image-01-FPS" / clip, frames)
                write_wav(root / "AudioWAV" / f"{clip}.wav", seconds, freq=200 + 40 * n)
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
        out[split] = rows
    return out


def write_spec(path: Path, shape=(257, 30), seed: int = 0, fmt: str = "pkl") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    if fmt == "npy":
        np.save(path.with_suffix(".npy"), arr)
    else:
        path.with_suffix(".pkl").write_bytes(pickle.dumps(arr))


def make_ks(root: Path, classes=("playing guitar", "singing", "tapping pen"), extra_classes=("unused class",),
            train_per_class: int = 3, test_per_class: int = 1, frames: int = 4, spec_shape=(257, 30)) -> dict:
    """OGM-GE AVDataset: stat.txt, my_train.txt/my_test.txt (`class,id`), visual/, audio_spec/*.pkl."""
    root.mkdir(parents=True, exist_ok=True)
    all_classes = list(classes) + list(extra_classes)
    (root / "stat.txt").write_text("\n".join(all_classes) + "\n")
    out, n = {}, 0
    for split, per in (("train", train_per_class), ("test", test_per_class)):
        rows = []
        for c in classes:
            for _ in range(per):
                vid = f"vid{n:03d}_000010_000020"
                rows.append(f"{c},{vid}")
                write_frames(root / "visual" / vid, frames)
                write_spec(root / "audio_spec" / vid, spec_shape, seed=n)
                n += 1
        (root / f"my_{split}.txt").write_text("\n".join(rows) + "\n")
        out[split] = rows
    return out


def make_ave(root: Path, classes=("Church bell", "Male speech, man speaking", "Dog"), train_per_class: int = 3,
             val_per_class: int = 1, test_per_class: int = 1, frames: int = 4, spec_shape=(257, 30),
             duplicate: tuple[int, str] | None = None) -> dict:
    """AVE release lists (`Class&ytid&quality&start&end`) + OGM-GE visual/ and audio_spec/ + stat.txt.

    `duplicate=(k, other_class)` appends a second train row for the k-th train id with `other_class`.
    """
    import csv
    import io

    root.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([[c] for c in classes])
    (root / "stat.txt").write_text(buf.getvalue())
    out, n = {}, 0
    for split, name, per in (("train", "trainSet.txt", train_per_class), ("val", "valSet.txt", val_per_class),
                             ("test", "testSet.txt", test_per_class)):
        rows = []
        for c in classes:
            for _ in range(per):
                vid = f"yt{n:04d}abc"
                rows.append(f"{c}&{vid}&good&0&10")
                write_frames(root / "visual" / vid, frames)
                write_spec(root / "audio_spec" / vid, spec_shape, seed=n)
                n += 1
        if split == "train" and duplicate is not None:
            k, other = duplicate
            vid = rows[k].split("&")[1]
            rows.append(f"{other}&{vid}&good&2&8")
        (root / name).write_text("\n".join(rows) + "\n")
        out[split] = rows
    return out


def make_nyud2(root: Path, classes=("bathroom", "bedroom", "kitchen"), train_per_class: int = 3,
               test_per_class: int = 1, half=(20, 16), rgb=(200, 40, 40), depth=(90, 90, 90)) -> dict:
    """QMF NYUD2: <split>/<class>/*.png with RGB (left) | depth (right) side by side."""
    out = {}
    for split, per in (("train", train_per_class), ("test", test_per_class)):
        paths = []
        for c in classes:
            for k in range(per):
                arr = np.empty((half[1], 2 * half[0], 3), dtype=np.uint8)
                arr[:, : half[0]] = rgb
                arr[:, half[0]:] = depth
                p = root / split / c / f"{k:04d}.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(p)
                paths.append(p)
        out[split] = paths
    return out


MVSA_WORDS = ["happy", "sad", "day", "the", "a", "great", "bad", "news", "cat", "dog", "love", "hate", "rain", "sun"]


def make_mvsa(root: Path, per_label=(2, 1, 1), labels=("positive", "neutral", "negative"), size=(30, 24)) -> dict:
    """QMF MVSA-Single: {train,dev,test}.jsonl rows {id,label,text,img}, images under data/."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out, n = {}, 0
    for split, per in zip(("train", "dev", "test"), per_label):
        rows = []
        for lab in labels:
            for _ in range(per):
                words = rng.choice(MVSA_WORDS, size=8)
                row = {"id": str(n), "label": lab, "text": " ".join(words), "img": f"data/{n}.jpg"}
                write_image(root / "data" / f"{n}.jpg", (100 + 10 * n % 150, 120, 140), size, noise=20, seed=n)
                rows.append(row)
                n += 1
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        out[split] = rows
    return out


def make_tokenizer(directory: Path) -> Path:
    """A tiny WordPiece vocabulary saved as a local BERT tokenizer (no hub access)."""
    from transformers import BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "_"] + MVSA_WORDS
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(words) + "\n")
    if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters:  # transformers >= 5
        tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    else:
        tok = BertTokenizerFast(vocab_file=str(vocab))
    tok.save_pretrained(str(directory))
    return directory


def run_config(dataset: str, root, params: dict | None = None, noise: dict | None = None, **data):
    tree = {"data": {"dataset": dataset, "root": str(root), "params": params or {}, **data}}
    if noise:
        tree["noise"] = noise
    return config_from_dict(tree, "test")

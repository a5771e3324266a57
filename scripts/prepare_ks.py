#!/usr/bin/env python
"""Kinetics-Sounds videos → the OGM-GE AVDataset layout calray's `ks` reads.

    python scripts/prepare_ks.py --raw /data/kinetics-sounds --out data/KineticSound

Input: videos as <raw>/<split>/<class name>/<video id>.mp4 (the usual Kinetics download layout;
the split folders default to train/ and test/). Writes <out>/visual/<id>/frame_00001.jpg …
(ffmpeg, --fps, at most --max-frames), <out>/audio_spec/<id>.pkl (OGM-GE's 257×1004 normalised
log spectrogram), <out>/stat.txt (the sorted class names), <out>/my_train.txt and my_test.txt
(`class,id`). Class folder names have spaces and underscores normalised to one space.
Ends with counts per split and class, checked against OGM-GE's lists (31 classes, 14,799 / 2,597).
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from _prep_common import (PrepError, extract_frames, extract_wav, find_ffmpeg, ogm_av_spectrogram, parallel, report,
                          save_spectrogram, write_lines)

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raw", type=Path, required=True, help="folder with <split>/<class>/<video> files")
    p.add_argument("--out", type=Path, required=True, help="output root")
    p.add_argument("--train-dir", default="train", help="train split folder under --raw")
    p.add_argument("--test-dir", default="test", help="test split folder under --raw (Kinetics' val)")
    p.add_argument("--fps", type=float, default=1.0, help="frames per second to extract")
    p.add_argument("--max-frames", type=int, default=10, help="frames kept per clip (10-s clips at 1 fps)")
    p.add_argument("--format", choices=["pkl", "npy"], default="pkl", help="spectrogram file format")
    p.add_argument("--ffmpeg", default=None, help="ffmpeg executable (default: ffmpeg on PATH)")
    p.add_argument("--jobs", type=int, default=4, help="parallel ffmpeg jobs")
    return p.parse_args(argv)


def class_name(folder: str) -> str:
    return " ".join(folder.replace("_", " ").split())


def scan(raw: Path, split_dir: str) -> list[tuple[str, str, Path]]:
    """(class, id, video path) for every video of one split, sorted."""
    root = raw / split_dir
    if not root.is_dir():
        raise PrepError(f"{root} not found")
    rows = []
    for cls in sorted(d for d in root.iterdir() if d.is_dir()):
        for v in sorted(cls.iterdir()):
            if v.suffix.lower() in VIDEO_SUFFIXES:
                rows.append((class_name(cls.name), v.stem, v))
    if not rows:
        raise PrepError(f"no videos under {root}/<class>/")
    return rows


def prepare_clip(ffmpeg: str, out: Path, fps: float, max_frames: int, fmt: str, clip_id: str, video: Path) -> None:
    from calray.data.media import read_wav

    target = out / "visual" / clip_id
    if target.exists():
        shutil.rmtree(target)
    extract_frames(ffmpeg, video, target, fps, max_frames)
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "a.wav"
        extract_wav(ffmpeg, video, wav, 22050)
        samples, sr = read_wav(wav, "prepare_ks.py")
    save_spectrogram(ogm_av_spectrogram(samples, sr), out / "audio_spec" / clip_id, fmt)


def write_class_list(path: Path, classes: list[str]) -> None:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([[c] for c in classes])
    path.write_text(buf.getvalue())


def main(argv=None) -> int:
    args = parse_args(argv)
    ffmpeg = find_ffmpeg(args.ffmpeg)
    splits = {"train": scan(args.raw, args.train_dir), "test": scan(args.raw, args.test_dir)}
    ids = Counter(i for rows in splits.values() for _, i, _ in rows)
    repeated = [i for i, n in ids.items() if n > 1]
    if repeated:
        raise PrepError(f"{len(repeated)} video ids occur more than once (e.g. {repeated[:3]}); ids must be unique")
    args.out.mkdir(parents=True, exist_ok=True)
    items = [(cid, video) for rows in splits.values() for _, cid, video in rows]
    failed = parallel(lambda item: prepare_clip(ffmpeg, args.out, args.fps, args.max_frames, args.format, *item),
                      items, args.jobs, "clips")
    failed_ids = {cid for cid, _ in failed}
    classes = sorted({c for rows in splits.values() for c, _, _ in rows})
    write_class_list(args.out / "stat.txt", classes)
    for s, rows in splits.items():
        kept = [(c, i) for c, i, _ in rows if i not in failed_ids]
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(kept)
        (args.out / f"my_{s}.txt").write_text(buf.getvalue())
    if failed_ids:
        write_lines(args.out / "failed.txt", sorted(failed_ids))
        print(f"WARNING: {len(failed_ids)} clips failed and are left out of the lists (see failed.txt)")
    counts = {s: Counter(c for c, i, _ in rows if i not in failed_ids) for s, rows in splits.items()}
    report(counts, {"train": 14799, "test": 2597}, 31, source="OGM-GE's Kinetics-Sounds lists")
    print(f"\nlayout written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

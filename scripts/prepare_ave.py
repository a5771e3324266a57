#!/usr/bin/env python
"""AVE release (AVE/<ytid>.mp4, Annotations.txt, trainSet/valSet/testSet.txt) → the layout calray's `ave` reads.

    python scripts/prepare_ave.py --raw /data/AVE_Dataset --out data/AVE

Writes <out>/visual/<ytid>/frame_00001.jpg … (ffmpeg, --fps), <out>/audio_spec/<ytid>.pkl
(OGM-GE's 257×1004 normalised log spectrogram), <out>/stat.txt (the 28 class names, sorted,
one CSV row each — names such as "Male speech, man speaking" are quoted) and copies of the
three split lists (`Class&ytid&quality&start&end`, header lines removed). Ids listed more than
once are reported; the loader's data.params.duplicates decides which row counts.
Ends with counts per split and class, checked against the release (28 classes, 3,339 / 402 / 402 rows).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from _prep_common import (PrepError, extract_frames, extract_wav, find_ffmpeg, ogm_av_spectrogram, parallel, report,
                          save_spectrogram, write_lines)
from prepare_ks import write_class_list

LISTS = {"train": "trainSet.txt", "val": "valSet.txt", "test": "testSet.txt"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raw", type=Path, required=True, help="AVE_Dataset folder (AVE/, Annotations.txt, *Set.txt)")
    p.add_argument("--out", type=Path, required=True, help="output root")
    p.add_argument("--fps", type=float, default=1.0, help="frames per second to extract")
    p.add_argument("--max-frames", type=int, default=10, help="frames kept per clip (10-s clips at 1 fps)")
    p.add_argument("--format", choices=["pkl", "npy"], default="pkl", help="spectrogram file format")
    p.add_argument("--ffmpeg", default=None, help="ffmpeg executable (default: ffmpeg on PATH)")
    p.add_argument("--jobs", type=int, default=4, help="parallel ffmpeg jobs")
    return p.parse_args(argv)


def read_rows(path: Path) -> list[list[str]]:
    """`&`-separated rows without the `Category&VideoID&…` header the release files may carry."""
    if not path.is_file():
        raise PrepError(f"missing {path}")
    rows = [line.strip().split("&") for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    if rows and rows[0][0].lower() == "category":
        rows = rows[1:]
    bad = [r for r in rows if len(r) < 2]
    if bad:
        raise PrepError(f"{path}: malformed row {bad[0]}")
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    ffmpeg = find_ffmpeg(args.ffmpeg)
    lists = {s: read_rows(args.raw / name) for s, name in LISTS.items()}
    annotations = args.raw / "Annotations.txt"
    classes = sorted({r[0] for r in (read_rows(annotations) if annotations.is_file() else [])}
                     | {r[0] for rows in lists.values() for r in rows})
    videos = args.raw / "AVE"
    if not videos.is_dir():
        raise PrepError(f"{videos} not found: the release keeps its videos in AVE/")
    ids = sorted({r[1] for rows in lists.values() for r in rows})
    args.out.mkdir(parents=True, exist_ok=True)

    def prepare(clip_id):
        from calray.data.media import read_wav

        video = videos / f"{clip_id}.mp4"
        target = args.out / "visual" / clip_id
        if target.exists():
            shutil.rmtree(target)
        extract_frames(ffmpeg, video, target, args.fps, args.max_frames)
        with tempfile.TemporaryDirectory() as tmp:
            wav = Path(tmp) / "a.wav"
            extract_wav(ffmpeg, video, wav, 22050)
            samples, sr = read_wav(wav, "prepare_ave.py")
        save_spectrogram(ogm_av_spectrogram(samples, sr), args.out / "audio_spec" / clip_id, args.format)

    failed = parallel(prepare, ids, args.jobs, "clips")
    if failed:
        write_lines(args.out / "failed.txt", sorted(failed))
        print(f"WARNING: {len(failed)} clips failed (see failed.txt); the loader reports listed clips without files")
    write_class_list(args.out / "stat.txt", classes)
    for s, rows in lists.items():
        write_lines(args.out / LISTS[s], ("&".join(r) for r in rows))
        dup = [i for i, n in Counter(r[1] for r in rows).items() if n > 1]
        print(f"{s}: {len(rows)} rows, {len(set(r[1] for r in rows))} unique ids, {len(dup)} repeated"
              + (f" (e.g. {dup[:3]})" if dup else ""))
    counts = {s: Counter(r[0] for r in rows) for s, rows in lists.items()}
    report(counts, {"train": 3339, "val": 402, "test": 402}, 28, source="the AVE release lists")
    print(f"\nlayout written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python
"""CREMA-D public release (AudioWAV/ + VideoFlash/) → the OGM-GE layout calray's `cremad` reads.

    python scripts/prepare_cremad.py --raw /data/CREMA-D --out data/CREMA-D [--splits DIR] [--spectrograms]

Writes <out>/Image-<fps>-FPS/<clip>/frame_00001.jpg … (ffmpeg, --fps frames per second),
<out>/AudioWAV (a link to the raw wavs), <out>/train.csv and test.csv (`clip_id,EMO`), and with
--spectrograms <out>/audio_spec/<clip>.npy (the OGM-GE 257×188 spectrogram, for `audio: spec`).

Splits: --splits DIR reuses OGM-GE's train.csv/test.csv (6,698 / 744 clips, the split CAL and
the anchors report on); otherwise a seeded split stratified by emotion holds out --test-fraction.
Ends with counts per split and emotion, checked against the full release.
"""

from __future__ import annotations

import argparse
import shutil
from collections import Counter
from pathlib import Path

from _prep_common import (PrepError, extract_frames, find_ffmpeg, link_or_copy_dir, parallel, report,
                          save_spectrogram, write_lines)

CLASSES = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]
TOTAL_PER_CLASS = {"ANG": 1271, "DIS": 1271, "FEA": 1271, "HAP": 1271, "NEU": 1087, "SAD": 1271}
OGM_TRAIN = {"ANG": 1166, "DIS": 1142, "FEA": 1138, "HAP": 1148, "NEU": 973, "SAD": 1131}
OGM_TEST = {c: TOTAL_PER_CLASS[c] - OGM_TRAIN[c] for c in CLASSES}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raw", type=Path, required=True, help="CREMA-D release folder with AudioWAV/ and VideoFlash/")
    p.add_argument("--out", type=Path, default=None, help="output root (default: --raw)")
    p.add_argument("--fps", type=int, default=1, help="frames per second to extract (OGM-GE: 1)")
    p.add_argument("--splits", type=Path, default=None, help="folder with OGM-GE's train.csv and test.csv to reuse")
    p.add_argument("--test-fraction", type=float, default=0.1, help="held-out share when making our own split")
    p.add_argument("--seed", type=int, default=0, help="seed of our own split")
    p.add_argument("--spectrograms", action="store_true", help="also store spectrograms in audio_spec/*.npy")
    p.add_argument("--skip-frames", action="store_true", help="do not extract frames (they exist already)")
    p.add_argument("--ffmpeg", default=None, help="ffmpeg executable (default: ffmpeg on PATH)")
    p.add_argument("--jobs", type=int, default=4, help="parallel ffmpeg/spectrogram jobs")
    return p.parse_args(argv)


def clip_label(clip: str) -> str:
    parts = clip.split("_")
    if len(parts) < 3 or parts[2] not in CLASSES:
        raise PrepError(f"{clip}: not a CREMA-D clip name (expected e.g. 1001_DFA_ANG_XX)")
    return parts[2]


def read_csv_split(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        raise PrepError(f"missing {path}")
    rows = []
    for line in path.read_text(encoding="utf-8-sig").splitlines():
        if line.strip():
            clip, emo = [x.strip() for x in line.split(",")[:2]]
            rows.append((clip, emo))
    return rows


def make_split(clips: list[str], fraction: float, seed: int) -> dict[str, list[tuple[str, str]]]:
    from calray.data.base import stratified_split

    labels = [CLASSES.index(clip_label(c)) for c in clips]
    keep, held = stratified_split(labels, fraction, seed)
    return {"train": [(clips[i], CLASSES[labels[i]]) for i in keep],
            "test": [(clips[i], CLASSES[labels[i]]) for i in held]}


def main(argv=None) -> int:
    args = parse_args(argv)
    raw, out = args.raw, args.out or args.raw
    wav_dir, video_dir = raw / "AudioWAV", raw / "VideoFlash"
    if not wav_dir.is_dir():
        raise PrepError(f"{wav_dir} not found: --raw must be the CREMA-D release folder")
    clips = sorted(p.stem for p in wav_dir.glob("*.wav"))
    if not clips:
        raise PrepError(f"no .wav files in {wav_dir}")
    for c in clips:
        clip_label(c)
    out.mkdir(parents=True, exist_ok=True)
    link_or_copy_dir(wav_dir, out / "AudioWAV")

    failed: set[str] = set()
    if not args.skip_frames:
        ffmpeg = find_ffmpeg(args.ffmpeg)
        if not video_dir.is_dir():
            raise PrepError(f"{video_dir} not found: frames come from the .flv videos")
        frame_root = out / f"Image-{args.fps:02d}-FPS"

        def frames(clip):
            target = frame_root / clip
            if target.exists():
                shutil.rmtree(target)
            extract_frames(ffmpeg, video_dir / f"{clip}.flv", target, args.fps)

        print(f"extracting frames at {args.fps} fps into {frame_root}")
        failed |= set(parallel(frames, clips, args.jobs, "frames"))
    if args.spectrograms:
        from calray.data.media import SpectrogramSettings, ogm_spectrogram, read_wav

        settings = SpectrogramSettings()

        def spectrogram(clip):
            samples, sr = read_wav(wav_dir / f"{clip}.wav", "prepare_cremad.py")
            save_spectrogram(ogm_spectrogram(samples, sr, settings), out / "audio_spec" / clip, "npy")

        print("computing spectrograms into", out / "audio_spec")
        failed |= set(parallel(spectrogram, clips, args.jobs, "spectrograms"))

    if args.splits:
        splits = {s: read_csv_split(args.splits / f"{s}.csv") for s in ("train", "test")}
        known = set(clips)
        absent = [c for rows in splits.values() for c, _ in rows if c not in known]
        if absent:
            print(f"WARNING: {len(absent)} listed clips have no wav, e.g. {absent[:3]}")
        expected_sizes, per_class = {"train": 6698, "test": 744}, {"train": OGM_TRAIN, "test": OGM_TEST}
        source = "OGM-GE's CREMA-D split"
    else:
        usable = [c for c in clips if c not in failed]
        splits = make_split(usable, args.test_fraction, args.seed)
        expected_sizes, per_class = None, None
        source = "the full release"
    if failed:
        print(f"WARNING: {len(failed)} clips failed to prepare, e.g. {sorted(failed)[:3]}; "
              + ("they stay in the reused lists (the loader reports them)" if args.splits else "left out of the split"))
    for s, rows in splits.items():
        write_lines(out / f"{s}.csv", (f"{c},{e}" for c, e in rows))
    counts = {s: Counter(e for _, e in rows) for s, rows in splits.items()}
    if expected_sizes is None:
        counts_all = Counter()
        for c in counts.values():
            counts_all.update(c)
        report({**counts, "all": counts_all}, {"all": 7442}, 6, {"all": TOTAL_PER_CLASS}, source)
    else:
        report(counts, expected_sizes, 6, per_class, source)
    print(f"\nlayout written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

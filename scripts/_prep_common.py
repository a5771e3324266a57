"""Shared by the scripts/prepare_*.py dataset preparation scripts: ffmpeg calls, the OGM-GE
audio-visual spectrogram, parallel work with failure accounting, and the closing count report."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the scripts run as `python scripts/prepare_x.py` from a checkout
    sys.path.insert(0, str(REPO))


class PrepError(SystemExit):
    """A problem that stops preparation: printed as one `error: …` line, exit status 1."""

    def __init__(self, message: str):
        super().__init__(f"error: {message}")


def find_ffmpeg(explicit: str | None) -> str:
    path = shutil.which(explicit or "ffmpeg")
    if path is None:
        raise PrepError(
            f"ffmpeg not found ({explicit or 'ffmpeg'} is not an executable on PATH). Install it "
            "(e.g. `apt-get install ffmpeg` or `conda install -c conda-forge ffmpeg`) or pass --ffmpeg /path/to/ffmpeg."
        )
    return path


def run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:1])} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")


def extract_frames(ffmpeg: str, video: Path, out_dir: Path, fps: float, max_frames: int | None = None) -> int:
    """Frames at `fps` as out_dir/frame_00001.jpg, … (OGM-GE naming); returns how many were written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [ffmpeg, "-nostdin", "-loglevel", "error", "-y", "-i", str(video), "-vf", f"fps={fps}", "-q:v", "2"]
    if max_frames:
        cmd += ["-frames:v", str(max_frames)]
    run(cmd + [str(out_dir / "frame_%05d.jpg")])
    n = len(list(out_dir.glob("frame_*.jpg")))
    if n == 0:
        raise RuntimeError(f"no frames extracted from {video}")
    return n


def extract_wav(ffmpeg: str, video: Path, wav: Path, sample_rate: int) -> None:
    wav.parent.mkdir(parents=True, exist_ok=True)
    run([ffmpeg, "-nostdin", "-loglevel", "error", "-y", "-i", str(video), "-vn", "-ac", "1", "-ar",
         str(sample_rate), "-acodec", "pcm_s16le", str(wav)])


def ogm_av_spectrogram(samples: np.ndarray, sr: int) -> np.ndarray:
    """OGM-GE's KS/AVE spectrogram (pre-processing/obtain_audio_spectrogram.py): audio at 22,050 Hz
    tiled and cut to 160,000 samples, clipped to [−1, 1], scipy power spectrogram (nperseg 512,
    noverlap 353), log(· + 1e-7), standardised per clip → 257×1004 float32."""
    from scipy import signal

    from calray.data.media import resample

    y = resample(samples, sr, 22050)
    y = np.tile(y, int(np.ceil(160000 / len(y))))[:160000]
    y = np.clip(y, -1.0, 1.0)
    _, _, spec = signal.spectrogram(y, 22050, nperseg=512, noverlap=353)
    spec = np.log(spec + 1e-7)
    return ((spec - spec.mean()) / (spec.std() + 1e-9)).astype(np.float32)


def save_spectrogram(spec: np.ndarray, path_no_suffix: Path, fmt: str) -> Path:
    path_no_suffix.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "npy":
        path = path_no_suffix.with_suffix(".npy")
        np.save(path, spec)
    else:
        path = path_no_suffix.with_suffix(".pkl")
        path.write_bytes(pickle.dumps(np.asarray(spec, dtype=np.float32)))
    return path


def parallel(fn: Callable, items: Iterable, jobs: int, label: str) -> dict:
    """Run fn(item) for every item on `jobs` threads (ffmpeg and numpy release the GIL).

    Returns {item: error message} for the items that failed; nothing is silently skipped.
    """
    items = list(items)
    failures = {}

    def guarded(item):
        try:
            fn(item)
        except Exception as e:  # report every failure, carry on with the rest
            failures[item] = f"{type(e).__name__}: {e}"

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for k, _ in enumerate(pool.map(guarded, items), start=1):
            if k % 500 == 0 or k == len(items):
                print(f"  {label}: {k}/{len(items)}", flush=True)
    if failures:
        print(f"  {label}: {len(failures)} failed, e.g. {next(iter(failures.items()))}", file=sys.stderr)
    return failures


def report(counts: dict[str, Counter], expected_sizes: dict[str, int] | None = None,
           expected_classes: int | None = None, expected_per_class: dict[str, dict[str, int]] | None = None,
           source: str = "the full public release") -> int:
    """Print per-split, per-class counts and compare them with the known numbers; returns #mismatches."""
    classes = sorted(set().union(*[set(c) for c in counts.values()])) if counts else []
    splits = list(counts)
    width = max([len(c) for c in classes] + [5])
    print("\ncounts per split and class:")
    print(f"  {'class':<{width}} " + " ".join(f"{s:>7}" for s in splits))
    for c in classes:
        print(f"  {c:<{width}} " + " ".join(f"{counts[s].get(c, 0):>7}" for s in splits))
    print(f"  {'total':<{width}} " + " ".join(f"{sum(counts[s].values()):>7}" for s in splits))
    problems = []
    if expected_classes is not None and len(classes) != expected_classes:
        problems.append(f"{len(classes)} classes, expected {expected_classes}")
    for s, n in (expected_sizes or {}).items():
        got = sum(counts.get(s, Counter()).values())
        if got != n:
            problems.append(f"{s}: {got} samples, expected {n}")
    for s, per in (expected_per_class or {}).items():
        for c, n in per.items():
            got = counts.get(s, Counter()).get(c, 0)
            if got != n:
                problems.append(f"{s}/{c}: {got}, expected {n}")
    if problems:
        print(f"\nWARNING: counts differ from {source}:", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
    else:
        print(f"\ncounts match {source}." if (expected_sizes or expected_classes or expected_per_class)
              else "\n(no reference counts to check)")
    return len(problems)


def link_or_copy_dir(src: Path, dst: Path) -> None:
    """Make `dst` show `src` (a symlink where possible) unless they are the same directory."""
    if dst.resolve() == src.resolve() or dst.exists():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.symlink(src.resolve(), dst, target_is_directory=True)
    except OSError:
        shutil.copytree(src, dst)


def write_lines(path: Path, lines: Iterable[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))

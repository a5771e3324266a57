#!/usr/bin/env python
"""Raw MVSA-Single (data/<id>.jpg, data/<id>.txt, labelResultAll.txt) → the QMF jsonl layout of `mvsa_single`.

    python scripts/prepare_mvsa.py --raw /data/MVSA_Single --out data/MVSA_Single

Each tweet has a text label and an image label. --policy decides the sample's label:
  agree (default): keep tweets whose two labels are equal — what QMF's MVSA_Single files hold
                   (2,592 tweets: 1,555 / 518 / 519);
  xu:              the common rule of Xu et al.: drop positive/negative conflicts, a neutral
                   label yields to the other one (about 4,500 tweets).
The split is ours: seeded and stratified by label, --fractions train/dev/test (default 0.6 0.2
0.2, QMF's proportions); it is not QMF's exact split — use QMF's jsonl files for that.
Writes <out>/train.jsonl, dev.jsonl, test.jsonl (rows {"id","label","text","img"}, img relative
to <out>) and links <out>/data to the raw images. Ends with counts per split and label.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from _prep_common import PrepError, link_or_copy_dir, report

LABELS = ("positive", "neutral", "negative")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raw", type=Path, required=True, help="MVSA_Single folder with data/ and labelResultAll.txt")
    p.add_argument("--out", type=Path, default=None, help="output root (default: --raw)")
    p.add_argument("--policy", choices=["agree", "xu"], default="agree", help="how text/image labels combine")
    p.add_argument("--fractions", type=float, nargs=3, default=[0.6, 0.2, 0.2], metavar=("TRAIN", "DEV", "TEST"))
    p.add_argument("--seed", type=int, default=0, help="split seed")
    return p.parse_args(argv)


def combine(text_label: str, image_label: str, policy: str) -> str | None:
    if text_label == image_label:
        return text_label
    if policy == "agree" or {text_label, image_label} == {"positive", "negative"}:
        return None
    return image_label if text_label == "neutral" else text_label


def read_labels(path: Path, policy: str) -> tuple[dict[str, str], int]:
    """{id: label} and the number of tweets dropped by the policy."""
    if not path.is_file():
        raise PrepError(f"{path} not found")
    labels, dropped = {}, 0
    for lineno, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        parts = line.strip().split("\t")
        if not line.strip() or (lineno == 1 and parts[0].upper() == "ID"):
            continue
        try:
            text_label, image_label = [x.strip() for x in parts[1].split(",")]
        except (IndexError, ValueError):
            raise PrepError(f"{path}:{lineno}: expected `ID<TAB>text,image`, got {line!r}") from None
        for lab in (text_label, image_label):
            if lab not in LABELS:
                raise PrepError(f"{path}:{lineno}: unknown label {lab!r}")
        label = combine(text_label, image_label, policy)
        if label is None:
            dropped += 1
        else:
            labels[parts[0].strip()] = label
    return labels, dropped


def read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # some raw tweets are not UTF-8
    return " ".join(text.split())


def split(ids: list[str], labels: list[int], fractions, seed: int) -> dict[str, list[int]]:
    from calray.data.base import stratified_split

    f_train, f_dev, f_test = (f / sum(fractions) for f in fractions)
    rest, test = stratified_split(labels, f_test, seed)
    keep, dev = stratified_split([labels[i] for i in rest], f_dev / (f_train + f_dev), seed + 1)
    return {"train": [int(rest[i]) for i in keep], "dev": [int(rest[i]) for i in dev], "test": [int(i) for i in test]}


def main(argv=None) -> int:
    args = parse_args(argv)
    raw, out = args.raw, args.out or args.raw
    data = raw / "data"
    if not data.is_dir():
        raise PrepError(f"{data} not found: --raw must be the MVSA_Single folder")
    labels, dropped = read_labels(raw / "labelResultAll.txt", args.policy)
    ids, missing = [], []
    for tweet in sorted(labels, key=lambda s: (len(s), s)):
        if (data / f"{tweet}.jpg").is_file() and (data / f"{tweet}.txt").is_file():
            ids.append(tweet)
        else:
            missing.append(tweet)
    if missing:
        print(f"WARNING: {len(missing)} labelled tweets lack an image or text file and are left out, e.g. {missing[:3]}")
    print(f"policy {args.policy!r}: {len(ids)} tweets kept, {dropped} dropped for conflicting labels")
    y = [LABELS.index(labels[t]) for t in ids]
    parts = split(ids, y, args.fractions, args.seed)
    out.mkdir(parents=True, exist_ok=True)
    link_or_copy_dir(data, out / "data")
    counts = {}
    for name, idx in parts.items():
        rows = [{"id": ids[i], "label": labels[ids[i]], "text": read_text(data / f"{ids[i]}.txt"),
                 "img": f"data/{ids[i]}.jpg"} for i in idx]
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                           encoding="utf-8")
        counts[name] = Counter(r["label"] for r in rows)
    expected = {"train": 1555, "dev": 518, "test": 519} if args.policy == "agree" else None
    report(counts, expected, 3, source="QMF's MVSA_Single files (their split sizes)")
    print(f"\nlayout written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

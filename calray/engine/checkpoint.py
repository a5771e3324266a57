"""Checkpoints: atomic torch files (calray.io), loaded with `weights_only=True`."""

from __future__ import annotations

from pathlib import Path

import torch

from calray.errors import CalrayError
from calray.io import atomic_write_bytes


def save_checkpoint(state: dict, path: Path) -> None:
    atomic_write_bytes(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CalrayError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CalrayError(f"{path}: cannot load checkpoint ({type(e).__name__}: {e})") from None



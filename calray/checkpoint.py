"""Atomic file writes (temp file + rename, the umask's mode) and checkpoints loaded with
`weights_only=True`. Torch is imported only by the checkpoint functions, so the sweep driver's
writers (calray.sweep_results) stay light."""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path

from calray.errors import CalrayError

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows.

    Linux (>= 4.7) shows it as the ``Umask:`` line of /proc/self/status; reading that changes
    nothing, so no other thread (a DataLoader's, Ray's) can create a file under a wrong mask
    meanwhile. Elsewhere `os.umask` is the only reader and it *sets* the mask while reading it:
    set-and-restore under a lock, so two writers here never interleave and leave a wrong mask
    behind (a file another thread creates in that instant is the remaining, tiny, risk). Not
    cached: the mask may change while the process runs.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, writer) -> None:
    """Call `writer(fileobj)` on a temp file beside `path`, fsync, then rename over `path`.

    The file gets the mode a plain `open(path, "w")` would give it, ``0o666 & ~umask`` (0644
    under umask 022): mkstemp creates its temp file 0600, which would keep summaries, reports and
    checkpoints on shared storage from every other user.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            writer(f)
            f.flush()
            try:
                os.fchmod(f.fileno(), 0o666 & ~current_umask())
            except OSError:  # a filesystem without Unix modes (some CIFS/FUSE mounts) refuses it
                pass
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(state: dict, path: Path) -> None:
    import torch

    atomic_write_bytes(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise CalrayError(f"{path}: checkpoint not found")
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CalrayError(f"{path}: cannot load checkpoint ({type(e).__name__}: {e})") from None


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")

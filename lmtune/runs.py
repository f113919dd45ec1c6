"""Run folders: what a fitted method leaves on disk, written atomically.

A run folder holds ``card.json`` (method, model, task, hyper-parameters, data hash, metrics, versions)
and the method's learned tensors as safetensors files. The folder is assembled under a temporary name
beside its destination and renamed into place, so an interrupted save never leaves a half-written run and
an existing run is replaced only once the new one is complete.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from lmtune.errors import LmtuneError

CARD = "card.json"


def check_run_destination(path: str | Path) -> Path:
    """``path`` can receive a run: it is absent, an empty folder, or a run folder (which is replaced)."""
    dest = Path(path)
    if dest.exists() and not (dest / CARD).is_file():
        if not dest.is_dir() or any(dest.iterdir()):
            raise LmtuneError(f"{dest} exists and is not an lmtune run folder; choose another --out")
    return dest


def write_run(path: str | Path, card: dict, write_files: Callable[[Path], None]) -> Path:
    """Create the run folder ``path`` with ``card`` and whatever ``write_files(folder)`` writes."""
    import lmtune

    dest = check_run_destination(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    card = dict(card, lmtune_version=lmtune.__version__,
                created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        write_files(tmp)
        (tmp / CARD).write_text(json.dumps(card, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
        _apply_umask(tmp)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.rename(dest, old)
            os.rename(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _apply_umask(folder: Path) -> None:
    """mkdtemp makes folders private (0700); give the run the permissions any new folder would get."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.rglob("*"):
        os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)


def read_card(path: str | Path) -> dict:
    p = Path(path)
    card = p / CARD
    if not card.is_file():
        raise LmtuneError(f"{p} is not an lmtune run folder: {CARD} is missing")
    try:
        return json.loads(card.read_text())
    except json.JSONDecodeError as e:
        raise LmtuneError(f"{card}: not valid JSON ({e})") from None


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path`` (same suffix), then rename it over ``path``:
    a reader never sees half a file, and a failure leaves the old one as it was."""
    path = Path(path)
    if path.is_dir():
        raise LmtuneError(f"{path} is a folder: give a file name to write to")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}-{os.urandom(4).hex()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")

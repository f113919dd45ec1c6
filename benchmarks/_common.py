"""Shared helpers for the benchmark scripts: environment record, timing, JSON output.

Every benchmark prints exactly one JSON object on stdout; everything else goes to stderr.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def cpu_model() -> str:
    from lmtune.profiling import cpu_name

    return cpu_name()


def loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def lmtune_revision() -> dict:
    """The git commit of the checkout and whether lmtune/ has uncommitted changes (read-only git calls)."""
    import subprocess

    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "--short", "HEAD")
    dirty = git("status", "--porcelain", "--", "lmtune")
    return {"lmtune_commit": commit or None, "lmtune_dirty": None if dirty is None else bool(dirty)}


def environment() -> dict:
    """What the numbers depend on: threads, library versions, CPU, load at start."""
    import torch
    import transformers

    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
        "cuda_available": bool(torch.cuda.is_available()),
        "lmtune_cache": os.environ.get("LMTUNE_CACHE") or None,
        "loadavg_start": loadavg(),
        **lmtune_revision(),
    }


def wait_for_idle(max_wait_s: float, threshold: float = 0.5) -> dict:
    """Wait (at most ``max_wait_s``) for the 1-minute load average to fall below ``threshold``."""
    t0 = time.perf_counter()
    la = loadavg()
    while max_wait_s > 0 and la is not None and la[0] >= threshold and time.perf_counter() - t0 < max_wait_s:
        time.sleep(5)
        la = loadavg()
    return {"waited_s": round(time.perf_counter() - t0, 1), "loadavg_after_wait": la}


def add_wait_idle(ap) -> None:
    """The ``--wait-idle`` option every benchmark takes."""
    ap.add_argument("--wait-idle", type=float, default=0.0,
                    help="wait up to this many seconds for the 1-min load average to fall below 0.5")


def start(args) -> dict:
    """Wait for an idle machine as ``--wait-idle`` asks, then record the environment."""
    idle = wait_for_idle(args.wait_idle)
    env = environment()
    env.update(idle)
    return env


def median(xs):
    return float(statistics.median(xs)) if xs else None


def emit(result: dict) -> None:
    result.setdefault("environment", {})["loadavg_end"] = loadavg()
    json.dump(result, sys.stdout, indent=2, default=_default)
    sys.stdout.write("\n")
    sys.stdout.flush()


def save(result: dict, path) -> None:
    """Write ``result`` as JSON to ``path`` atomically (a temporary file beside it, then a rename), readable
    by all: an interrupted run never leaves half a result. Records the end load average, as :func:`emit`."""
    import os
    import tempfile
    from pathlib import Path

    result.setdefault("environment", {})["loadavg_end"] = loadavg()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(result, f, indent=2, default=_default)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log(f"wrote {path}")


def _default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    return str(o)

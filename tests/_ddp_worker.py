"""Worker for the torchrun test: the same script runs as 1 process (plain python) or N (torchrun).

    python -m torch.distributed.run --nproc_per_node 2 tests/_ddp_worker.py OUT [--grad-accum G] [--nan-at S]

Trains the shared tiny MLP (no dropout, so the loss is deterministic) with a fixed global batch; rank 0
writes ``OUT/params.pt`` and ``OUT/result.json``. With ``--nan-at S`` a second run follows in the same
processes (one launch is seconds of import time saved) in which the last rank's loss turns NaN at step S:
every rank must raise TrainingDiverged (none may hang), and each writes ``OUT/diverged_<rank>.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _resume_worker import N_TRAIN, problem  # noqa: E402


def run(out: Path, grad_accum: int, nan_at: int | None = None):
    from lmtune.training import TrainConfig, train

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    n = N_TRAIN - 3  # 37 examples: a short last batch, and shares that differ between ranks
    _, params, loss_fn, val_fn, lengths = problem()
    done = {"steps": 0}

    def maybe_nan_loss(idx):
        loss, tokens = loss_fn(idx)
        if done["steps"] + 1 == nan_at and rank == world - 1:
            loss = loss * float("nan")
        return loss, tokens

    def on_step(step):
        done["steps"] = step

    config = TrainConfig(epochs=3, lr=2e-2, batch_size=8, grad_accum=grad_accum, warmup=2, clip=0.5,
                         weight_decay=0.01, seed=3, patience=5, checkpoint_every=2,
                         checkpoint_dir=None if nan_at else str(out / "ckpt"))
    result = train(params, maybe_nan_loss, n, config, lengths=lengths[:n], val_fn=val_fn, progress=False,
                   on_step=on_step)
    return params, result


def main(argv=None):
    from lmtune.training import TrainingDiverged

    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--nan-at", type=int, help="after the normal run, a second one that diverges at this step")
    args = ap.parse_args(argv)
    out = Path(args.out)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    params, result = run(out, args.grad_accum)
    if rank == 0:
        torch.save({k: p.detach() for k, p in params.items()}, out / "params.pt")
        (out / "result.json").write_text(json.dumps({**result.to_dict(), "world": world}))
    if args.nan_at is not None:
        try:
            run(out, args.grad_accum, args.nan_at)
        except TrainingDiverged as e:
            (out / f"diverged_{rank}.txt").write_text(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())

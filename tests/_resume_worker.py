"""Subprocess for the kill-and-resume test, and the tiny problem every training test shares.

    python tests/_resume_worker.py OUT [--resume] [--kill-at STEP] [--checkpoint-every K]

Trains a small MLP with dropout whose loss also draws from numpy's and Python's generators (input noise),
so a resume that forgot any RNG state would not reproduce the run. ``--kill-at`` SIGKILLs the process
after that optimizer step. On completion it writes ``OUT/params.pt`` and ``OUT/result.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
from pathlib import Path

import numpy as np
import torch

N_TRAIN, N_VAL, DIM, HIDDEN = 40, 16, 6, 8


def make_data(seed: int = 0, n: int = N_TRAIN, n_val: int = N_VAL):
    """Two noisy Gaussian blobs: X (n, DIM) float32, y (n,) int64, and a validation split."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n + n_val,), generator=g)
    X = torch.randn(n + n_val, DIM, generator=g) + 1.5 * (2 * y[:, None] - 1) * torch.linspace(1, 0, DIM)
    return X[:n], y[:n], X[n:], y[n:]


def make_model(dropout: float = 0.0, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(DIM, HIDDEN), torch.nn.Tanh(), torch.nn.Dropout(dropout),
                               torch.nn.Linear(HIDDEN, 2))


def problem(dropout: float = 0.0, noise: float = 0.0, seed: int = 0):
    """(model, params, loss_fn, val_fn, lengths) over :func:`make_data`."""
    X, y, Xv, yv = make_data(seed)
    model = make_model(dropout, seed)
    params = dict(model.named_parameters())
    lengths = [int(v) for v in torch.arange(N_TRAIN) % 7 + 1]

    def loss_fn(idx):
        model.train()
        x = X[idx]
        if noise:
            eps = torch.from_numpy(np.random.standard_normal(x.shape).astype(np.float32))
            x = x + noise * random.random() * eps
        loss = torch.nn.functional.cross_entropy(model(x), y[idx], reduction="sum")
        return loss, sum(lengths[i] for i in idx)

    def val_fn():
        model.eval()
        return -float(torch.nn.functional.cross_entropy(model(Xv), yv))

    return model, params, loss_fn, val_fn, lengths


def main(argv=None):
    from lmtune.training import TrainConfig, train

    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--kill-at", type=int)
    ap.add_argument("--checkpoint-every", type=int, default=3)
    args = ap.parse_args(argv)
    out = Path(args.out)
    np.random.seed(1)
    random.seed(2)
    _, params, loss_fn, val_fn, lengths = problem(dropout=0.3, noise=0.1)
    config = TrainConfig(epochs=4, lr=3e-2, batch_size=8, grad_accum=2, warmup=3, weight_decay=0.01, seed=5,
                         checkpoint_dir=str(out / "ckpt"), checkpoint_every=args.checkpoint_every)

    def on_step(step):
        if step == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    result = train(params, loss_fn, N_TRAIN, config, lengths=lengths, val_fn=val_fn, resume=args.resume,
                   progress=False, on_step=on_step)
    torch.save({n: p.detach() for n, p in params.items()}, out / "params.pt")
    (out / "result.json").write_text(json.dumps(result.to_dict()))


if __name__ == "__main__":
    sys.exit(main())

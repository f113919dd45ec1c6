r"""Closed-form linear fine-tuning of the label-token logits (seed 000, T. Ruiz 2024).

The adapted model adds a learned linear correction to the label logits::

    p_a(y | x) = softmax(L + z W + b)           z: (d,) last-token hidden state, L: (K,) label logits
                                                W: (d, K), b: (K,)

and ``W`` solves a regularised least-squares problem over the N training prompts::

    W, b = argmin || (T - L) - Z W - 1 b^T ||_F^2 + lambda ||W||_F^2       Z: (N, d), L, T: (N, K)

whose solution is ``W = (Z_c^T Z_c + lambda I)^{-1} Z_c^T (T - L)_c`` on column-centred data (see
:mod:`lmtune.ridge` for the solver, the conditioning checks and the automatic choice of ``lambda``).

Where this departs from the seed, and why:

* **Targets.** The seed plugs the one-hot labels into ``log P``, which is ``log 0 = -inf``. We use
  label-smoothed targets ``P = (1 - eps) onehot + eps / K`` (``smoothing=eps``, default 0.1), so ``T = log P``
  is finite; ``eps`` sets how far the fitted log-odds go (``log((1 - eps + eps/K) / (eps/K))``, 2.94 for
  K = 2, eps = 0.1) and so how confident the adapted model becomes.
* **Row centring.** Softmax ignores a constant added to a row of logits, but least squares does not:
  regressing ``log P - L`` directly would spend ``W`` on matching the absolute level of the logits (tens of
  units, varying per prompt) rather than their differences. Both ``T`` and ``L`` are centred across the K
  labels of each row first, which changes nothing about the probabilities the fitted model can express.
* **Intercept.** An unpenalised per-label bias ``b`` (``fit_intercept=True``) absorbs the base model's
  prior preference for one label word, so the penalty acts only on the prompt-dependent part.
* **Regularisation.** ``lambda`` is not optional in practice (the seed's own footnote): ``Z^T Z`` of LLM
  hidden states is badly conditioned. When not given it is chosen by generalised cross-validation (or
  exact leave-one-out) from one eigendecomposition, at no extra pass over the model.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from lmtune import ridge
from lmtune.errors import LmtuneError
from lmtune.features import Features
from lmtune.metrics import classification_report
from lmtune.methods.base import LabelTokenClassifier, softmax
from lmtune.models import DEFAULT_MODEL, LM
from lmtune.runs import write_run
from lmtune.tasks import ClassificationTask

HEAD_FILE = "head.safetensors"
STREAM_ROWS = 4096  # rows of Z converted to float64 at a time while accumulating


def smoothed_log_targets(y: np.ndarray, n_classes: int, smoothing: float) -> np.ndarray:
    """log of label-smoothed one-hot targets, (N, K): finite for any ``0 < smoothing < 1``."""
    if not 0.0 < smoothing < 1.0:
        raise LmtuneError(f"smoothing must lie strictly between 0 and 1 (log 0 is undefined), got {smoothing}")
    P = np.full((len(y), n_classes), smoothing / n_classes)
    P[np.arange(len(y)), y] += 1.0 - smoothing
    return np.log(P)


def center_rows(X: np.ndarray) -> np.ndarray:
    """Subtract each row's mean: the part of a logit vector that softmax can see."""
    return X - X.mean(axis=1, keepdims=True)


def regression_targets(feats: Features, y: np.ndarray, n_classes: int, smoothing: float) -> np.ndarray:
    """Y = centre(log P) - centre(L), (N, K) float64."""
    return center_rows(smoothed_log_targets(y, n_classes, smoothing)) - center_rows(feats.L.astype(np.float64))


def _finite(v) -> float | None:
    """JSON has no inf: an infinite condition number or score is written as null."""
    return float(v) if np.isfinite(v) else None


class ClosedFormClassifier(LabelTokenClassifier):
    """Closed-form ridge correction ``W`` of the label-token logits.

    Parameters
    ----------
    model, task, batch_size, progress, cache
        See :class:`lmtune.methods.base.LabelTokenClassifier`.
    lam : float or None
        Ridge penalty; ``None`` chooses it by ``criterion`` over a grid.
    criterion : {"gcv", "loo"}
        Automatic ``lambda`` by generalised cross-validation (from the Gram statistics alone) or exact
        leave-one-out (reads the cached features once more).
    smoothing : float
        Label smoothing of the targets, in (0, 1).
    fit_intercept : bool
        Fit an unpenalised per-label bias.

    Attributes
    ----------
    weight_ : np.ndarray
        W, (d, K).
    bias_ : np.ndarray
        b, (K,).
    lam_ : float
    solution_ : lmtune.ridge.RidgeSolution
        Solver used, condition number, and the lambda selection curve when automatic.
    train_metrics_ : dict
        Metrics of the fitted head on the training set.
    solve_seconds_, extract_seconds_ : float
    """

    method = "closed-form"

    def __init__(self, model: "LM | str" = DEFAULT_MODEL, task: ClassificationTask | None = None, *,
                 lam: float | None = None, criterion: str = "gcv", smoothing: float = 0.1,
                 fit_intercept: bool = True, batch_size: int = 16, progress: bool | None = None,
                 cache: bool = True):
        super().__init__(model, task, batch_size=batch_size, progress=progress, cache=cache)
        self.lam = lam
        self.criterion = criterion
        self.smoothing = smoothing
        self.fit_intercept = fit_intercept

    def fit(self, data) -> "ClosedFormClassifier":
        feats, y, ds = self.features(data, labeled=True)
        self.extract_seconds_ = self.last_extract_seconds_
        self.fit_features(feats, y)
        self.n_train_ = len(ds)
        self.data_hash_ = ds.content_hash()
        self.data_path_ = ds.path
        return self

    def fit_features(self, feats: Features, y: np.ndarray) -> "ClosedFormClassifier":
        """Solve for ``W`` from extracted features: milliseconds, no model pass."""
        task = self._check_task()
        if len(np.unique(y)) < 2:
            raise LmtuneError("the training data holds only one label; the closed-form head needs at least two")
        t0 = time.perf_counter()
        Y = regression_targets(feats, y, task.n_classes, self.smoothing)  # (N, K)
        acc = ridge.RidgeAccumulator(feats.Z.shape[1], task.n_classes)
        for s in range(0, len(Y), STREAM_ROWS):
            acc.update(feats.Z[s:s + STREAM_ROWS], Y[s:s + STREAM_ROWS])
        loo = self.lam is None and self.criterion == "loo"
        # rows are passed for exact LOO, and whenever N < d (the N x N decomposition is cheaper)
        rows = loo or (self.lam is None and len(Y) < feats.Z.shape[1])
        sol = ridge.fit(acc.stats(), lam=self.lam, criterion=self.criterion, fit_intercept=self.fit_intercept,
                        Z=feats.Z if rows else None, Y=Y if loo else None)
        self.solve_seconds_ = time.perf_counter() - t0
        self.weight_, self.bias_, self.lam_, self.solution_ = sol.W, sol.b, float(sol.lam), sol
        self.train_metrics_ = classification_report(y, softmax(self.logits(feats)), task.labels)
        return self

    def logits(self, feats: Features) -> np.ndarray:
        if not hasattr(self, "weight_"):
            raise LmtuneError("this ClosedFormClassifier is not fitted yet: call fit() first")
        out = np.empty(feats.L.shape, dtype=np.float64)  # (N, K); Z may be memory-mapped: stream it
        for s in range(0, len(out), STREAM_ROWS):
            rows = slice(s, s + STREAM_ROWS)
            out[rows] = feats.L[rows] + feats.Z[rows].astype(np.float64) @ self.weight_ + self.bias_
        return out

    # -- persistence ----------------------------------------------------------------------------------

    def card(self) -> dict:
        sol = self.solution_
        sel = sol.selection
        return {
            **self.base_card(),
            "params": {"lam": self.lam, "criterion": self.criterion, "smoothing": self.smoothing,
                       "fit_intercept": self.fit_intercept},
            "fitted": {"lam": self.lam_, "solver": sol.solver, "condition_number": _finite(sol.condition_number),
                       "lambda_selection": None if sel is None else {
                           "criterion": sel.criterion, "grid": [float(v) for v in sel.grid],
                           "scores": [_finite(v) for v in sel.scores]},
                       "solve_seconds": self.solve_seconds_, "extract_seconds": getattr(self, "extract_seconds_", None)},
            "train": {"path": getattr(self, "data_path_", None), "n": getattr(self, "n_train_", None),
                      "sha256": getattr(self, "data_hash_", None)},
            "train_metrics": self.train_metrics_,
        }

    def save(self, path: str | Path) -> Path:
        def write(folder: Path) -> None:
            # float64 (tiny, and reloads exactly); contiguous, because safetensors.numpy writes the
            # raw buffer and silently scrambles a transposed array
            save_file({"W": np.ascontiguousarray(self.weight_), "b": np.ascontiguousarray(self.bias_)},
                      str(folder / HEAD_FILE), metadata={"format": "lmtune.closed-form", "lam": repr(self.lam_)})
        return write_run(path, self.card(), write)

    @classmethod
    def from_card(cls, card: dict, folder: Path, model, **kwargs) -> "ClosedFormClassifier":
        p = card.get("params", {})
        est = cls(model, ClassificationTask.from_dict(card["task"]), lam=p.get("lam"),
                  criterion=p.get("criterion", "gcv"), smoothing=p.get("smoothing", 0.1),
                  fit_intercept=p.get("fit_intercept", True), **kwargs)
        t = load_file(str(Path(folder) / HEAD_FILE))
        est.weight_, est.bias_ = t["W"], t["b"]
        est.lam_ = card["fitted"]["lam"]
        est.train_metrics_ = card.get("train_metrics")
        return est

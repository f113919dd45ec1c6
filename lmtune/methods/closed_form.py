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
  exact leave-one-out) from one eigendecomposition, at no extra pass over the model, or by maximising the
  Bayesian evidence (``criterion="evidence"``, :mod:`lmtune.bayes_linear`).

Bayesian (``bayes="exact"``): the ridge problem is Bayesian linear regression, so the posterior over ``W`` is
Gaussian in closed form, its mean the ridge solution. The fitted head then predicts with the posterior
predictive, ``p(y | x) = E_W softmax(L + z W + b)`` (probit approximation or Monte Carlo), and reports the
uncertainty of every record; see :mod:`lmtune.bayes_linear` for the model, the evidence, the row-centred
targets (``K - 1`` independent outputs) and why the observation noise stays out of the logits.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from lmtune import bayes_linear, ridge
from lmtune.errors import LmtuneError
from lmtune.features import Features
from lmtune.metrics import classification_report
from lmtune.methods.base import LabelTokenClassifier, softmax
from lmtune.models import DEFAULT_MODEL, LM
from lmtune.runs import write_run
from lmtune.tasks import ClassificationTask

HEAD_FILE = "head.safetensors"
CRITERIA = ("gcv", "loo", "evidence")
BAYES_MODES = ("exact",)
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
    criterion : {"gcv", "loo", "evidence"}
        Automatic ``lambda`` by generalised cross-validation (from the Gram statistics alone), exact
        leave-one-out (reads the cached features once more), or by maximising the Bayesian evidence over the
        prior and noise precisions (lambda = alpha/beta; the log evidence is reported).
    smoothing : float
        Label smoothing of the targets, in (0, 1).
    fit_intercept : bool
        Fit an unpenalised per-label bias.
    bayes : {None, "exact"}
        ``"exact"``: keep the Gaussian posterior of ``W`` and predict with the posterior predictive (noise
        precision from the evidence at the chosen lambda).
    predictive : {"probit", "mc"}
        How the posterior predictive turns Gaussian logits into probabilities: the probit (mean-field)
        approximation, or Monte Carlo.
    mc_samples : int
        Monte Carlo draws per record (``predictive="mc"``).
    seed : int
        Seed of the Monte Carlo draws (the same draws serve every record, so predictions are reproducible).

    Attributes
    ----------
    weight_ : np.ndarray
        W, (d, K).
    bias_ : np.ndarray
        b, (K,).
    lam_ : float
    solution_ : lmtune.ridge.RidgeSolution
        Solver used, condition number, and the lambda selection curve when automatic.
    evidence_ : lmtune.bayes_linear.Evidence or None
        alpha, beta and the log evidence, with ``criterion="evidence"`` or ``bayes="exact"``.
    posterior_ : lmtune.bayes_linear.Posterior or None
        The Gaussian posterior, with ``bayes="exact"``.
    train_metrics_ : dict
        Metrics of the fitted head on the training set.
    solve_seconds_, extract_seconds_ : float
    """

    method = "closed-form"
    bayes_modes = BAYES_MODES

    def __init__(self, model: "LM | str" = DEFAULT_MODEL, task: ClassificationTask | None = None, *,
                 lam: float | None = None, criterion: str = "gcv", smoothing: float = 0.1,
                 fit_intercept: bool = True, bayes: str | None = None, predictive: str = "probit",
                 mc_samples: int = 1000, seed: int = 0, batch_size: int = 16, progress: bool | None = None,
                 cache: bool = True):
        super().__init__(model, task, batch_size=batch_size, progress=progress, cache=cache)
        self.lam = lam
        self.criterion = criterion
        self.smoothing = smoothing
        self.fit_intercept = fit_intercept
        self.bayes = bayes
        self.predictive = predictive
        self.mc_samples = mc_samples
        self.seed = seed

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
        self._check_params()
        if len(np.unique(y)) < 2:
            raise LmtuneError("the training data holds only one label; the closed-form head needs at least two")
        t0 = time.perf_counter()
        Y = regression_targets(feats, y, task.n_classes, self.smoothing)  # (N, K)
        acc = ridge.RidgeAccumulator(feats.Z.shape[1], task.n_classes)
        for s in range(0, len(Y), STREAM_ROWS):
            acc.update(feats.Z[s:s + STREAM_ROWS], Y[s:s + STREAM_ROWS])
        loo = self.lam is None and self.criterion == "loo"
        # rows are passed for exact LOO, and whenever N < d (the N x N decomposition is cheaper)
        rows = loo or ((self.lam is None or self.bayes) and len(Y) < feats.Z.shape[1])
        self.evidence_ = self.posterior_ = None
        if self.criterion == "evidence" or self.bayes:
            lam, selection = self.lam, None
            if lam is None and self.criterion != "evidence":  # lambda by GCV/LOO, beta by the evidence
                sol = ridge.fit(acc.stats(), criterion=self.criterion, fit_intercept=self.fit_intercept,
                                Z=feats.Z if rows else None, Y=Y if loo else None)
                lam, selection = sol.lam, sol.selection
            # the targets' rows sum to 0 (centred across labels): K - 1 independent outputs
            res = bayes_linear.fit(acc.stats(), lam=lam, n_outputs=task.n_classes - 1,
                                   Z=feats.Z if rows else None, fit_intercept=self.fit_intercept)
            sol = res.solution if selection is None else dataclasses.replace(res.solution, selection=selection)
            self.evidence_ = res.evidence
            if self.bayes:
                self.posterior_ = res.posterior
        else:
            sol = ridge.fit(acc.stats(), lam=self.lam, criterion=self.criterion, fit_intercept=self.fit_intercept,
                            Z=feats.Z if rows else None, Y=Y if loo else None)
        self.solve_seconds_ = time.perf_counter() - t0
        self.weight_, self.bias_, self.lam_, self.solution_ = sol.W, sol.b, float(sol.lam), sol
        self.train_metrics_ = classification_report(y, softmax(self.logits(feats)), task.labels)
        return self

    def _check_params(self) -> None:
        if self.criterion not in CRITERIA:
            raise LmtuneError(f"criterion must be one of {', '.join(CRITERIA)}; got {self.criterion!r}")
        if self.bayes not in (None, *BAYES_MODES):
            raise LmtuneError(f"closed-form offers bayes={', '.join(BAYES_MODES)} (or None); got {self.bayes!r}")
        try:
            bayes_linear._check_predictive(self.predictive, self.mc_samples)
        except ValueError as e:
            raise LmtuneError(str(e)) from None

    def _mean_logits(self, feats: Features) -> np.ndarray:
        out = np.empty(feats.L.shape, dtype=np.float64)  # (N, K); Z may be memory-mapped: stream it
        for s in range(0, len(out), STREAM_ROWS):
            rows = slice(s, s + STREAM_ROWS)
            out[rows] = feats.L[rows] + feats.Z[rows].astype(np.float64) @ self.weight_ + self.bias_
        return out

    def _predictive(self, feats: Features) -> tuple[np.ndarray, np.ndarray]:
        """Log posterior-predictive probabilities (N, K) and the variance of each adapted logit (N,)."""
        var = self.posterior_.variance(feats.Z)  # (N,)
        return bayes_linear.gaussian_softmax(self._mean_logits(feats), var, self.predictive, self.mc_samples,
                                             self.seed), var

    def logits(self, feats: Features) -> np.ndarray:
        """Adapted logits (N, K); with a posterior, the log posterior-predictive probabilities (whose softmax
        is the predictive itself), so every consumer of logits sees the Bayesian prediction."""
        if not hasattr(self, "weight_"):
            raise LmtuneError("this ClosedFormClassifier is not fitted yet: call fit() first")
        if getattr(self, "posterior_", None) is not None:
            return self._predictive(feats)[0]
        return self._mean_logits(feats)

    def uncertainty(self, data):
        """Predictions with their per-record uncertainty, from one feature pass.

        Returns
        -------
        logits : np.ndarray, shape (N, K)
            As :meth:`label_logits`.
        extras : dict of str to np.ndarray of shape (N,)
            With a posterior: ``"entropy"`` of the predictive distribution (nats) and ``"logit_std"``, the
            posterior standard deviation of each adapted logit. Empty without one.
        ds : lmtune.data.Dataset
        """
        feats, _, ds = self.features(data)
        if getattr(self, "posterior_", None) is None:
            return self.logits(feats), {}, ds
        logp, var = self._predictive(feats)
        return logp, {"entropy": bayes_linear.entropy(logp), "logit_std": np.sqrt(var)}, ds

    # -- persistence ----------------------------------------------------------------------------------

    def card(self) -> dict:
        sol = self.solution_
        sel = sol.selection
        post = getattr(self, "posterior_", None)
        return {
            **self.base_card(),
            "params": {"lam": self.lam, "criterion": self.criterion, "smoothing": self.smoothing,
                       "fit_intercept": self.fit_intercept, "bayes": self.bayes, "predictive": self.predictive,
                       "mc_samples": self.mc_samples, "seed": self.seed},
            "fitted": {"lam": self.lam_, "solver": sol.solver, "condition_number": _finite(sol.condition_number),
                       "lambda_selection": None if sel is None else {
                           "criterion": sel.criterion, "grid": [float(v) for v in sel.grid],
                           "scores": [_finite(v) for v in sel.scores]},
                       "solve_seconds": self.solve_seconds_, "extract_seconds": getattr(self, "extract_seconds_", None),
                       "evidence": None if getattr(self, "evidence_", None) is None else self.evidence_.to_dict(),
                       "posterior": None if post is None else {"n": post.n, "rank": int(post.s.size)}},
            "train": {"path": getattr(self, "data_path_", None), "n": getattr(self, "n_train_", None),
                      "sha256": getattr(self, "data_hash_", None)},
            "train_metrics": self.train_metrics_,
        }

    def save(self, path: str | Path) -> Path:
        def write(folder: Path) -> None:
            # float64 (tiny, and reloads exactly); contiguous, because safetensors.numpy writes the
            # raw buffer and silently scrambles a transposed array
            tensors = {"W": self.weight_, "b": self.bias_}
            post = getattr(self, "posterior_", None)
            if post is not None:  # Sigma in eigen-factors: (d, r) + (r,) instead of d x d
                tensors.update(posterior_V=post.V, posterior_s=post.s)
                if post.z_bar is not None:
                    tensors["posterior_z_bar"] = post.z_bar
            save_file({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in tensors.items()},
                      str(folder / HEAD_FILE), metadata={"format": "lmtune.closed-form", "lam": repr(self.lam_)})
        return write_run(path, self.card(), write)

    @classmethod
    def from_card(cls, card: dict, folder: Path, model, **kwargs) -> "ClosedFormClassifier":
        p = card.get("params", {})
        est = cls(model, ClassificationTask.from_dict(card["task"]), lam=p.get("lam"),
                  criterion=p.get("criterion", "gcv"), smoothing=p.get("smoothing", 0.1),
                  fit_intercept=p.get("fit_intercept", True), bayes=p.get("bayes"),
                  predictive=p.get("predictive", "probit"), mc_samples=p.get("mc_samples", 1000),
                  seed=p.get("seed", 0),
                  **kwargs)
        t = load_file(str(Path(folder) / HEAD_FILE))
        est.weight_, est.bias_ = t["W"], t["b"]
        fitted = card["fitted"]
        est.lam_ = fitted["lam"]
        ev = fitted.get("evidence")
        est.evidence_ = None if ev is None else bayes_linear.Evidence(**ev)
        est.posterior_ = None
        if est.bayes:
            est.posterior_ = bayes_linear.Posterior(est.weight_, est.bias_, t["posterior_V"], t["posterior_s"],
                                                    ev["alpha"], ev["beta"], t.get("posterior_z_bar"),
                                                    fitted["posterior"]["n"])
        est.train_metrics_ = card.get("train_metrics")
        return est

"""Classification metrics for evaluating adapted models: pure numpy, no sklearn.

Why hand-written
----------------
Each metric here is a few lines of numpy. Writing them ourselves buys three
things that calling scikit-learn would not:

* **One stable, JSON-able report.** :func:`classification_report` returns a
  single object made only of Python ``dict``/``list``/``str``/``int``/
  ``float``/``None`` with a fixed key order, so runs can be written to disk,
  diffed and compared across methods and versions. NaN never appears (it
  becomes ``None``), so ``json.dumps(..., allow_nan=False)`` always works.
* **Explicit conventions.** The multi-class Brier score and the expected
  calibration error have several competing definitions in the literature and
  in libraries; the ones used here are fixed and stated below, and do not
  change when a dependency is upgraded.
* **No sklearn at prediction time.** Evaluation runs next to inference; this
  module needs nothing but numpy. (The test-suite checks these functions
  against scikit-learn where sklearn has an equivalent.)

Inputs
------
``y_true``
    ``(N,)`` integer class indices in ``[0, K)``.
``probs``
    ``(N, K)`` finite, non-negative real numbers; every row sums to 1 within
    an absolute tolerance of ``1e-4`` (:data:`ROW_SUM_TOL`).
``y_pred``
    ``(N,)`` integer class indices (in ``[0, K)`` wherever ``K`` is known).

Every function validates its inputs and raises :class:`ValueError` with a
message naming the offending argument (wrong shape or dtype, empty input,
non-finite or negative probabilities, rows not summing to 1, labels out of
range). ``N`` must be at least 1.

Conventions
-----------
Predictions
    Where predictions are derived from ``probs`` (the report, the reliability
    diagram and ECE), the predicted class is ``argmax`` of the row; ties go to
    the lowest class index (``numpy.argmax`` semantics).
Confusion matrix
    ``C[i, j]`` counts examples whose true class is ``i`` and predicted class
    is ``j`` (rows = true, columns = predicted), for all ``K`` classes, even
    those absent from both ``y_true`` and ``y_pred``.
Precision / recall / F1
    Per class, one-vs-rest: ``precision = tp / (tp + fp)``,
    ``recall = tp / (tp + fn)``, ``f1 = 2 tp / (2 tp + fp + fn)`` (the
    harmonic mean of precision and recall). Any of these whose denominator is
    0 is defined as **0** (scikit-learn's ``zero_division=0``): a class that is
    never predicted has precision 0; a class absent from ``y_true`` has recall
    0 (and F1 0). Macro averages are the unweighted mean of the per-class
    values over **all K classes**, including such classes; ``macro_f1`` is the
    mean of per-class F1, not the F1 of macro precision and macro recall.
NLL
    ``mean_i -log(max(probs[i, y_i], eps))`` in nats, with ``eps = 1e-12`` by
    default, so a zero probability on the true class costs
    ``-log(1e-12) ~= 27.6`` instead of infinity.
Brier score
    The original multi-class form (Brier, 1950):
    ``mean_i sum_k (probs[i, k] - onehot(y_i)_k) ** 2``, ranging over
    ``[0, 2]``. For ``K = 2`` this is **twice** the binary Brier score
    ``mean_i (p_i - y_i) ** 2`` that ``sklearn.metrics.brier_score_loss``
    reports.
Reliability / ECE
    Top-label calibration: the confidence of an example is ``max_k probs[i, k]``
    and it is correct when the argmax equals ``y_i``. Confidences are put in
    ``B`` equal-width bins over ``[0, 1]`` with edges
    ``numpy.linspace(0, 1, B + 1)``; bin ``b`` is the half-open interval
    ``(edges[b], edges[b + 1]]``, except that the first bin is closed at 0
    (``[0, edges[1]]``), so a confidence lying exactly on an inner edge goes to
    the lower bin, a confidence of exactly 0 goes to bin 0 and a confidence of
    exactly 1 goes to the last bin. (A confidence slightly above 1, allowed by
    the row-sum tolerance, also goes to the last bin.) Then
    ``ECE = sum_b (n_b / N) * |acc_b - conf_b|`` over non-empty bins, where
    ``acc_b`` and ``conf_b`` are the mean correctness and mean confidence of
    bin ``b``. The default ``B`` is 15.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

__all__ = [
    "ROW_SUM_TOL",
    "accuracy",
    "confusion_matrix",
    "precision_recall_f1",
    "nll",
    "brier",
    "reliability",
    "ece",
    "flips",
    "classification_report",
    "to_jsonable",
]

#: Absolute tolerance on ``|sum_k probs[i, k] - 1|`` accepted by validation.
ROW_SUM_TOL = 1e-4


# --------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------


def _check_labels(y, name: str) -> np.ndarray:
    """Return ``y`` as a non-empty 1-D int64 array, or raise ValueError."""
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D of shape (N,), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty; at least one example is required")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class indices, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _check_n_classes(n_classes) -> int:
    if isinstance(n_classes, (bool, np.bool_)) or not isinstance(n_classes, (int, np.integer)):
        raise ValueError(f"n_classes must be a positive int, got {n_classes!r}")
    if n_classes < 1:
        raise ValueError(f"n_classes must be a positive int, got {n_classes}")
    return int(n_classes)


def _check_n_bins(n_bins) -> int:
    if isinstance(n_bins, (bool, np.bool_)) or not isinstance(n_bins, (int, np.integer)):
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    if n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins}")
    return int(n_bins)


def _check_range(y: np.ndarray, n_classes: int, name: str) -> None:
    bad = (y < 0) | (y >= n_classes)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{name} has {int(bad.sum())} value(s) outside [0, {n_classes}); "
            f"first at index {i}: {int(y[i])}"
        )


def _check_same_length(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{name_a} and {name_b} must have the same length, got {a.shape[0]} and {b.shape[0]}"
        )


def _check_probs(y_true, probs) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``(y_true, probs)`` and return them as (int64 (N,), float64 (N, K))."""
    y = _check_labels(y_true, "y_true")
    p = np.asarray(probs)
    if p.ndim != 2:
        raise ValueError(f"probs must be 2-D of shape (N, K), got shape {p.shape}")
    if p.shape[1] == 0:
        raise ValueError(f"probs must have at least one class column, got shape {p.shape}")
    if p.dtype == np.bool_ or not (
        np.issubdtype(p.dtype, np.floating) or np.issubdtype(p.dtype, np.integer)
    ):
        raise ValueError(f"probs must hold real numbers, got dtype {p.dtype}")
    p = p.astype(np.float64, copy=False)
    if p.shape[0] != y.shape[0]:
        raise ValueError(
            f"probs has {p.shape[0]} rows but y_true has {y.shape[0]} labels; "
            "expected probs of shape (N, K) with N == len(y_true)"
        )
    if not np.isfinite(p).all():
        i = int(np.flatnonzero(~np.isfinite(p).all(axis=1))[0])
        raise ValueError(f"probs must be finite; row {i} contains NaN or inf")
    if (p < 0).any():
        i = int(np.flatnonzero((p < 0).any(axis=1))[0])
        raise ValueError(f"probs must be non-negative; row {i} has a negative entry")
    sums = p.sum(axis=1)
    bad = np.abs(sums - 1.0) > ROW_SUM_TOL
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"probs rows must sum to 1 (tolerance {ROW_SUM_TOL:g}); {int(bad.sum())} row(s) do not, "
            f"first is row {i} with sum {sums[i]!r}"
        )
    _check_range(y, p.shape[1], "y_true")
    return y, p


def _check_pred_pair(y_true, y_pred, n_classes=None) -> tuple[np.ndarray, np.ndarray]:
    y = _check_labels(y_true, "y_true")
    yp = _check_labels(y_pred, "y_pred")
    _check_same_length(y, yp, "y_true", "y_pred")
    if n_classes is not None:
        _check_range(y, n_classes, "y_true")
        _check_range(yp, n_classes, "y_pred")
    return y, yp


# --------------------------------------------------------------------------
# hard-label metrics
# --------------------------------------------------------------------------


def accuracy(y_true, y_pred) -> float:
    """Fraction of examples whose predicted class equals the true class.

    Parameters
    ----------
    y_true : array_like of int, shape (N,)
        True class indices.
    y_pred : array_like of int, shape (N,)
        Predicted class indices.

    Returns
    -------
    float
        ``mean(y_true == y_pred)`` in ``[0, 1]``.

    Raises
    ------
    ValueError
        If either input is not a non-empty 1-D integer array, or their lengths differ.
    """
    y, yp = _check_pred_pair(y_true, y_pred)
    return float(np.mean(y == yp))


def confusion_matrix(y_true, y_pred, n_classes) -> np.ndarray:
    """Confusion matrix over all ``n_classes`` classes.

    Parameters
    ----------
    y_true : array_like of int, shape (N,)
        True class indices in ``[0, K)``.
    y_pred : array_like of int, shape (N,)
        Predicted class indices in ``[0, K)``.
    n_classes : int
        ``K``, the number of classes.

    Returns
    -------
    numpy.ndarray of int64, shape (K, K)
        ``C[i, j]`` = number of examples with true class ``i`` predicted as ``j``
        (rows = true, columns = predicted). ``C.sum() == N``.

    Raises
    ------
    ValueError
        On bad shapes/dtypes, mismatched lengths, or labels outside ``[0, K)``.
    """
    k = _check_n_classes(n_classes)
    y, yp = _check_pred_pair(y_true, y_pred, k)
    return np.bincount(y * k + yp, minlength=k * k).reshape(k, k).astype(np.int64)


def precision_recall_f1(y_true, y_pred, n_classes) -> dict:
    """Per-class and macro-averaged precision, recall and F1.

    Parameters
    ----------
    y_true : array_like of int, shape (N,)
        True class indices in ``[0, K)``.
    y_pred : array_like of int, shape (N,)
        Predicted class indices in ``[0, K)``.
    n_classes : int
        ``K``, the number of classes.

    Returns
    -------
    dict
        ``"precision"``, ``"recall"``, ``"f1"`` : numpy.ndarray of float64, shape (K,)
            Per-class one-vs-rest values. A value whose denominator is zero is
            0: precision of a class never predicted, recall (and F1) of a class
            absent from ``y_true``. ``f1 = 2 tp / (2 tp + fp + fn)``.
        ``"support"`` : numpy.ndarray of int64, shape (K,)
            Number of examples of each true class.
        ``"macro_precision"``, ``"macro_recall"``, ``"macro_f1"`` : float
            Unweighted means of the per-class values over all ``K`` classes
            (classes with zero support included).

    Raises
    ------
    ValueError
        On bad shapes/dtypes, mismatched lengths, or labels outside ``[0, K)``.
    """
    cm = confusion_matrix(y_true, y_pred, n_classes)
    tp = np.diag(cm).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)  # tp + fp
    support = cm.sum(axis=1)  # tp + fn
    f1_den = predicted + support  # 2 tp + fp + fn

    def _div(num, den):
        out = np.zeros_like(num, dtype=np.float64)
        np.divide(num, den, out=out, where=den > 0)
        return out

    precision = _div(tp, predicted)
    recall = _div(tp, support.astype(np.float64))
    f1 = _div(2.0 * tp, f1_den)
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "support": support.astype(np.int64),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
    }


# --------------------------------------------------------------------------
# probabilistic metrics
# --------------------------------------------------------------------------


def nll(y_true, probs, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of the true class (natural log).

    Parameters
    ----------
    y_true : array_like of int, shape (N,)
        True class indices in ``[0, K)``.
    probs : array_like of float, shape (N, K)
        Predicted class probabilities; rows sum to 1.
    eps : float, default 1e-12
        Lower clip applied to the true-class probability before the log, so the
        loss stays finite: ``mean_i -log(max(probs[i, y_i], eps))``.

    Returns
    -------
    float
        Mean NLL in nats, ``>= 0`` (at most ``-log(eps)``).

    Raises
    ------
    ValueError
        On invalid inputs (see module docstring) or ``eps`` not in ``(0, 1]``.
    """
    if not (isinstance(eps, (int, float, np.floating)) and 0.0 < float(eps) <= 1.0):
        raise ValueError(f"eps must be a float in (0, 1], got {eps!r}")
    y, p = _check_probs(y_true, probs)
    p_true = p[np.arange(y.shape[0]), y]
    return float(np.mean(-np.log(np.clip(p_true, float(eps), None))))


def brier(y_true, probs) -> float:
    """Multi-class Brier score (Brier, 1950).

    Parameters
    ----------
    y_true : array_like of int, shape (N,)
        True class indices in ``[0, K)``.
    probs : array_like of float, shape (N, K)
        Predicted class probabilities; rows sum to 1.

    Returns
    -------
    float
        ``mean_i sum_k (probs[i, k] - onehot(y_i)_k) ** 2``, in ``[0, 2]``.
        For ``K = 2`` this equals twice ``sklearn.metrics.brier_score_loss``
        (which scores only the positive-class probability).

    Raises
    ------
    ValueError
        On invalid inputs (see module docstring).
    """
    y, p = _check_probs(y_true, probs)
    onehot = np.zeros_like(p)
    onehot[np.arange(y.shape[0]), y] = 1.0
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def _bin_index(confidence: np.ndarray, bin_edges: np.ndarray) -> np.ndarray:
    """Bin index of each confidence: bin b is (edges[b], edges[b+1]], bin 0 also holds 0.

    Values below 0 or above 1 are clipped into the first/last bin.
    """
    n_bins = bin_edges.shape[0] - 1
    idx = np.searchsorted(bin_edges, confidence, side="left") - 1
    return np.clip(idx, 0, n_bins - 1)


def reliability(y_true, probs, n_bins: int = 15) -> dict:
    """Top-label reliability diagram data in equal-width confidence bins.

    Parameters
    ----------
    y_true : array_like of int, shape (N,)
        True class indices in ``[0, K)``.
    probs : array_like of float, shape (N, K)
        Predicted class probabilities; rows sum to 1. The prediction is the
        row argmax (ties to the lowest index) and the confidence the row max.
    n_bins : int, default 15
        ``B``, the number of equal-width bins over ``[0, 1]``.

    Returns
    -------
    dict
        ``"bin_edges"`` : numpy.ndarray of float64, shape (B + 1,)
            ``numpy.linspace(0, 1, B + 1)``. Bin ``b`` is
            ``(bin_edges[b], bin_edges[b + 1]]``; bin 0 is closed at 0.
        ``"counts"`` : numpy.ndarray of int64, shape (B,)
            Number of examples in each bin; sums to N.
        ``"confidence"`` : numpy.ndarray of float64, shape (B,)
            Mean top-label confidence per bin (NaN for an empty bin).
        ``"accuracy"`` : numpy.ndarray of float64, shape (B,)
            Fraction of correct predictions per bin (NaN for an empty bin).

    Raises
    ------
    ValueError
        On invalid inputs (see module docstring) or ``n_bins < 1``.
    """
    b = _check_n_bins(n_bins)
    y, p = _check_probs(y_true, probs)
    conf, correct = _top_label(y, p)
    edges = np.linspace(0.0, 1.0, b + 1)
    idx = _bin_index(conf, edges)
    counts = np.bincount(idx, minlength=b).astype(np.int64)
    conf_sum = np.bincount(idx, weights=conf, minlength=b)
    corr_sum = np.bincount(idx, weights=correct, minlength=b)
    mean_conf = np.full(b, np.nan)
    mean_acc = np.full(b, np.nan)
    nonempty = counts > 0
    mean_conf[nonempty] = conf_sum[nonempty] / counts[nonempty]
    mean_acc[nonempty] = corr_sum[nonempty] / counts[nonempty]
    return {"bin_edges": edges, "counts": counts, "confidence": mean_conf, "accuracy": mean_acc}


def ece(y_true, probs, n_bins: int = 15) -> float:
    """Top-label expected calibration error with equal-width bins.

    Parameters
    ----------
    y_true : array_like of int, shape (N,)
        True class indices in ``[0, K)``.
    probs : array_like of float, shape (N, K)
        Predicted class probabilities; rows sum to 1.
    n_bins : int, default 15
        Number of equal-width bins over ``[0, 1]`` (binning as in :func:`reliability`).

    Returns
    -------
    float
        ``sum_b (n_b / N) * |acc_b - conf_b|`` over non-empty bins, in ``[0, 1]``.

    Raises
    ------
    ValueError
        On invalid inputs (see module docstring) or ``n_bins < 1``.
    """
    rel = reliability(y_true, probs, n_bins)
    counts = rel["counts"]
    nonempty = counts > 0
    n = counts.sum()
    gaps = np.abs(rel["accuracy"][nonempty] - rel["confidence"][nonempty])
    return float(np.sum(counts[nonempty] / n * gaps))


def _top_label(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-label confidence and correctness (1.0 or 0.0) of each row (the argmax, ties to the lowest index)."""
    pred = np.argmax(p, axis=1)
    return p[np.arange(y.shape[0]), pred], (pred == y).astype(np.float64)


def _ece_rows(conf: np.ndarray, correct: np.ndarray, n_bins: int) -> np.ndarray:
    """ECE of every row of ``conf``/``correct`` (R, N), binned as :func:`reliability` bins."""
    R, N = conf.shape
    idx = _bin_index(conf, np.linspace(0.0, 1.0, n_bins + 1)) + n_bins * np.arange(R)[:, None]
    gap = np.bincount(idx.ravel(), weights=(correct - conf).ravel(), minlength=R * n_bins)
    return np.abs(gap).reshape(R, n_bins).sum(axis=1) / N


def ece_sampling(y_true, probs, n_bins: int = 15, draws: int = 2000, level: float = 0.9, seed: int = 0,
                 reference=None) -> dict:
    """How far a measured ECE can be told apart from the test set's sampling noise.

    ECE bins the records by confidence and takes absolute gaps, so on a finite test set it is biased
    upwards: a predictor calibrated by construction still scores well above 0 (with 200 binary records
    and a confident model, about 0.03 to 0.05). A claim such as "ECE halved" needs that scale beside it.

    Parameters
    ----------
    y_true : array_like of int, shape (N,)
    probs : array_like of float, shape (N, K)
    n_bins : int, default 15
        As in :func:`ece`.
    draws : int, default 2000
        Resamples for each estimate.
    level : float, default 0.9
        Coverage of the intervals.
    seed : int, default 0
    reference : array_like of float, shape (N, K), optional
        Another predictor's probabilities on the same records (for example the MAP model a Bayesian one
        is compared with): adds the paired bootstrap interval of ``ece(probs) / ece(reference)``.

    Returns
    -------
    dict
        ``"ece"``; ``"interval"``: the percentile bootstrap interval (records resampled with replacement);
        ``"calibrated_floor"``: the mean ECE, over ``draws`` label sets drawn from ``probs`` itself, of
        these same predictions (what a perfectly calibrated model with this confidence profile scores on
        N records), and ``"calibrated_floor_upper"``, that distribution's ``level`` quantile; with
        ``reference``: ``"reference_ece"``, ``"ratio"`` and ``"ratio_interval"`` (resamples where the
        reference's ECE is 0 are left out).
    """
    b = _check_n_bins(n_bins)
    y, p = _check_probs(y_true, probs)
    if draws < 1:
        raise ValueError(f"draws must be at least 1, got {draws}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    N = y.shape[0]
    conf, correct = _top_label(y, p)
    lo, hi = (1.0 - level) / 2.0, 1.0 - (1.0 - level) / 2.0
    rows = rng.integers(0, N, size=(draws, N))
    boot = _ece_rows(conf[rows], correct[rows], b)
    # labels drawn from the predicted distribution: the top label is right with probability conf
    drawn = (rng.random((draws, N)) < conf[None, :]).astype(np.float64)
    floor = _ece_rows(np.broadcast_to(conf, (draws, N)), drawn, b)
    out = {"ece": float(_ece_rows(conf[None], correct[None], b)[0]), "n": int(N), "level": level,
           "interval": [float(np.quantile(boot, lo)), float(np.quantile(boot, hi))],
           "calibrated_floor": float(floor.mean()), "calibrated_floor_upper": float(np.quantile(floor, level))}
    if reference is not None:
        _, r = _check_probs(y_true, reference)
        if r.shape != p.shape:
            raise ValueError(f"reference must have the shape of probs {p.shape}, got {r.shape}")
        rconf, rcorrect = _top_label(y, r)
        ref_boot = _ece_rows(rconf[rows], rcorrect[rows], b)
        ok = ref_boot > 0
        ratio = boot[ok] / ref_boot[ok]
        ref = float(_ece_rows(rconf[None], rcorrect[None], b)[0])
        out.update({"reference_ece": ref, "ratio": out["ece"] / ref if ref > 0 else None,
                    "ratio_interval": ([float(np.quantile(ratio, lo)), float(np.quantile(ratio, hi))]
                                       if ratio.size else None)})
    return out


# --------------------------------------------------------------------------
# comparing two prediction sets
# --------------------------------------------------------------------------


def flips(y_true, base_pred, new_pred) -> dict:
    """Which examples changed answer between two prediction sets, and how.

    Parameters
    ----------
    y_true : array_like of int, shape (N,)
        True class indices.
    base_pred : array_like of int, shape (N,)
        Predictions of the reference (e.g. un-adapted) model.
    new_pred : array_like of int, shape (N,)
        Predictions of the model being compared.

    Returns
    -------
    dict
        ``"n"`` : int, N.
        ``"flipped"`` : int, examples where ``new_pred != base_pred``
        (``= wrong_to_right + right_to_wrong + wrong_to_wrong``).
        ``"wrong_to_right"`` : int, base wrong and new right.
        ``"right_to_wrong"`` : int, base right and new wrong.
        ``"wrong_to_wrong"`` : int, answer changed but both are wrong.
        ``"net_gain"`` : int, ``wrong_to_right - right_to_wrong`` (equals the
        difference in number of correct predictions, new minus base).
        ``"indices"`` : dict of list of int
            Ascending example indices for each of the three categories.

    Raises
    ------
    ValueError
        If any input is not a non-empty 1-D integer array, or lengths differ.
    """
    y = _check_labels(y_true, "y_true")
    bp = _check_labels(base_pred, "base_pred")
    npred = _check_labels(new_pred, "new_pred")
    _check_same_length(y, bp, "y_true", "base_pred")
    _check_same_length(y, npred, "y_true", "new_pred")
    changed = bp != npred
    base_ok = bp == y
    new_ok = npred == y
    w2r = np.flatnonzero(changed & ~base_ok & new_ok)
    r2w = np.flatnonzero(changed & base_ok & ~new_ok)
    w2w = np.flatnonzero(changed & ~base_ok & ~new_ok)
    return {
        "n": int(y.shape[0]),
        "flipped": int(changed.sum()),
        "wrong_to_right": int(w2r.size),
        "right_to_wrong": int(r2w.size),
        "wrong_to_wrong": int(w2w.size),
        "net_gain": int(w2r.size) - int(r2w.size),
        "indices": {
            "wrong_to_right": w2r.tolist(),
            "right_to_wrong": r2w.tolist(),
            "wrong_to_wrong": w2w.tolist(),
        },
    }


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------


def to_jsonable(obj: Any) -> Any:
    """Recursively convert ``obj`` to plain JSON-compatible Python values.

    numpy arrays become (nested) lists, numpy scalars become ``int``/``float``/
    ``bool``/``str``, tuples become lists, and non-finite floats (NaN, +-inf)
    become ``None``, so the result always passes ``json.dumps(...,
    allow_nan=False)``. Dict keys that are numpy scalars are converted to the
    matching Python scalar; other keys are kept.

    Parameters
    ----------
    obj : Any
        Nested structure of dict / list / tuple / numpy arrays / scalars /
        str / None.

    Returns
    -------
    Any
        The converted structure (new containers; the input is not modified).

    Raises
    ------
    TypeError
        If ``obj`` contains a value that has no JSON representation.
    """
    if obj is None or isinstance(obj, bool):
        return obj
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, dict):
        return {
            (k.item() if isinstance(k, np.generic) else k): to_jsonable(v) for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    raise TypeError(f"to_jsonable: cannot convert object of type {type(obj).__name__} to JSON")


def classification_report(y_true, probs, labels: Sequence[str], n_bins: int = 15) -> dict:
    """All metrics for one prediction set, as a single stable JSON-able dict.

    Predictions are ``argmax(probs, axis=1)`` with ties going to the lowest
    class index.

    Parameters
    ----------
    y_true : array_like of int, shape (N,)
        True class indices in ``[0, K)``.
    probs : array_like of float, shape (N, K)
        Predicted class probabilities; rows sum to 1.
    labels : sequence of str, length K
        Distinct class names in class-index order.
    n_bins : int, default 15
        Number of equal-width bins for the ECE.

    Returns
    -------
    dict
        Only Python ``dict``/``list``/``str``/``int``/``float``/``None``, keys in
        this fixed order::

            {"n": int, "accuracy": float, "macro_precision": float,
             "macro_recall": float, "macro_f1": float, "nll": float,
             "brier": float, "ece": float, "ece_bins": int,
             "per_class": {label: {"precision": float, "recall": float,
                                   "f1": float, "support": int}, ...},
             "confusion_matrix": {"labels": [str, ...],
                                  "matrix": [[int, ...], ...]}}

        ``per_class`` follows class-index order; ``matrix`` rows are true
        classes and columns predicted classes. Values follow the conventions of
        the individual functions (see module docstring); NaN would appear as
        ``None``.

    Raises
    ------
    ValueError
        On invalid inputs, or if ``labels`` is not K distinct strings.
    """
    y, p = _check_probs(y_true, probs)
    k = p.shape[1]
    b = _check_n_bins(n_bins)
    if isinstance(labels, (str, bytes)):
        raise ValueError("labels must be a sequence of K class-name strings, not a single string")
    labels = list(labels)
    if len(labels) != k:
        raise ValueError(f"labels has {len(labels)} names but probs has K={k} classes")
    if not all(isinstance(s, str) for s in labels):
        raise ValueError(f"labels must all be strings, got {labels!r}")
    labels = [str(s) for s in labels]
    if len(set(labels)) != k:
        raise ValueError(f"labels must be distinct, got {labels!r}")

    pred = np.argmax(p, axis=1)
    prf = precision_recall_f1(y, pred, k)
    cm = confusion_matrix(y, pred, k)
    report = {
        "n": int(y.shape[0]),
        "accuracy": accuracy(y, pred),
        "macro_precision": prf["macro_precision"],
        "macro_recall": prf["macro_recall"],
        "macro_f1": prf["macro_f1"],
        "nll": nll(y, p),
        "brier": brier(y, p),
        "ece": ece(y, p, b),
        "ece_bins": b,
        "per_class": {
            name: {
                "precision": prf["precision"][i],
                "recall": prf["recall"][i],
                "f1": prf["f1"][i],
                "support": prf["support"][i],
            }
            for i, name in enumerate(labels)
        },
        "confusion_matrix": {"labels": labels, "matrix": cm},
    }
    return to_jsonable(report)

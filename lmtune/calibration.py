r"""Calibration: temperature scaling of any fitted method, and reliability diagrams.

A classifier is calibrated when, among the records it answers with confidence ``c``, a fraction ``c`` is
right. The metrics (ECE in equal-width bins, NLL, Brier) are in :mod:`lmtune.metrics`; this module adds
the standard post-hoc fix and the picture that shows what the ECE summarises.

Temperature scaling
-------------------
Guo et al. (2017), "On Calibration of Modern Neural Networks": divide every logit of a fitted model by one
number ``T > 0``, chosen to minimise the negative log-likelihood on held-out validation data,

.. math::

    T^* = \arg\min_{T > 0} \; -\frac1N \sum_i \log \operatorname{softmax}(f_i / T)_{y_i} .

``T > 1`` softens over-confident predictions, ``T < 1`` sharpens timid ones; the argmax, and so accuracy,
never changes. It is the baseline every Bayesian method has to beat on calibration: a posterior that
calibrates no better than one fitted scalar has bought its cost for nothing else than its per-record
uncertainty.

The NLL is convex in ``1/T`` (a log-sum-exp of functions linear in ``1/T`` minus a linear term), hence
unimodal in ``log T``. We minimise over ``log T`` (scale-free, and ``T > 0`` by construction) with
``scipy.optimize.minimize_scalar``'s bounded Brent method on ``[log 0.01, log 100]``: a 1-D search needs no
gradients, no learning rate and no iteration budget (Guo et al. used L-BFGS, which needs all three). The
result is then compared with ``T = 1`` and with both bounds, and replaced by whichever of them has an NLL no
higher (``T = 1`` winning ties), so fitting can never make the validation NLL worse. If the optimum lies at
a bound (validation data the model separates perfectly, whose NLL keeps falling as ``T -> 0`` until it
underflows to a flat 0 on which Brent could stop anywhere), the bound is returned and
:attr:`TemperatureScaled.at_bound_` says so.

:class:`TemperatureScaled` wraps any fitted estimator of the contract (anything with ``label_logits``):
``TemperatureScaled(est).fit(val_data)``; it predicts, evaluates, saves and loads like the method it wraps.
A method with a posterior (``label_logits`` = log predictive probabilities) is scaled the same way:
``softmax(log p / T)``.

Reliability diagrams
--------------------
:func:`reliability_figure` draws, per method, the accuracy of each equal-width confidence bin against
its mean confidence (bars: accuracy; the gap to the diagonal: the miscalibration the ECE weighs by the bin's
share of records), the diagonal of perfect calibration, the ECE in the title, and the number of records per
bin underneath (a bin with 3 records says little). It takes the bins of :func:`lmtune.metrics.reliability`
(not the records), so reports can redraw it from their JSON. :func:`reliability_overlay` puts several
methods on one set of axes. matplotlib's ``Figure`` is used directly, never ``pyplot``, so no global
backend is touched and rendering is Agg's.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from lmtune.errors import LmtuneError

__all__ = ["TemperatureScaled", "calibrate_run", "fit_temperature", "temperature_nll", "calibration_summary",
           "reliability_figure", "reliability_overlay", "T_BOUNDS"]

T_BOUNDS = (1e-2, 1e2)
_XATOL = 1e-6  # on log T: T to about 6 significant digits


def _check_logits(logits, y) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y)
    if f.ndim != 2 or f.shape[0] == 0:
        raise ValueError(f"logits must be 2-D (N, K) with N >= 1; got shape {f.shape}")
    if y.shape != (f.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y must hold {f.shape[0]} integer class indices; got shape {y.shape}, dtype {y.dtype}")
    if ((y < 0) | (y >= f.shape[1])).any():
        raise ValueError(f"y has class indices outside [0, {f.shape[1]})")
    if not np.isfinite(f).all():
        raise ValueError("logits contain NaN or infinite values")
    return f, y.astype(np.int64)


def temperature_nll(logits, y, temperature: float) -> float:
    """Mean NLL (nats) of ``softmax(logits / temperature)`` at the labels ``y``."""
    f, y = _check_logits(logits, y)
    return float(-log_softmax(f / temperature, axis=1)[np.arange(len(y)), y].mean())


def fit_temperature(logits, y, bounds: tuple[float, float] = T_BOUNDS) -> tuple[float, bool]:
    """The temperature minimising the NLL of ``softmax(logits / T)`` on ``(logits, y)``.

    Parameters
    ----------
    logits : array_like, shape (N, K)
    y : array_like of int, shape (N,)
    bounds : (float, float)
        Search interval for ``T``, ``0 < low < 1 < high``.

    Returns
    -------
    temperature : float
        Never with a higher NLL than ``T = 1``.
    at_bound : bool
        The optimum is (within tolerance) a bound of the interval: the true one may lie beyond it.
    """
    f, y = _check_logits(logits, y)
    low, high = (float(b) for b in bounds)
    if not 0 < low < 1 < high < math.inf:
        raise ValueError(f"bounds must satisfy 0 < low < 1 < high; got {bounds!r}")
    rows = np.arange(len(y))

    def nll(log_t: float) -> float:
        return float(-log_softmax(f * math.exp(-log_t), axis=1)[rows, y].mean())

    res = minimize_scalar(nll, bounds=(math.log(low), math.log(high)), method="bounded",
                          options={"xatol": _XATOL})
    log_t = float(res.x) if res.success else 0.0
    # Where the NLL keeps falling towards a bound (separable data) it underflows to a flat 0 and Brent may stop
    # anywhere on the flat part: a bound that does as well is where the search leads. T = 1 wins every tie.
    for cand in (math.log(low), math.log(high), 0.0):
        if nll(cand) <= nll(log_t):
            log_t = cand
    at_bound = min(log_t - math.log(low), math.log(high) - log_t) < 1e3 * _XATOL
    return math.exp(log_t), at_bound


class TemperatureScaled:
    """A fitted method whose logits are divided by one temperature fitted on validation data.

    Parameters
    ----------
    estimator
        A *fitted* estimator of the lmtune contract (it must have ``label_logits``).
    bounds : (float, float)
        Search interval of the temperature.

    Attributes
    ----------
    temperature_ : float
    at_bound_ : bool
        The fitted temperature sits at a bound of ``bounds``.
    val_nll_ : dict
        ``{"before": float, "after": float}``: validation NLL at T = 1 and at the fitted T.
    val_ : dict
        ``{"path", "n", "sha256"}`` of the validation data.
    """

    def __init__(self, estimator, bounds: tuple[float, float] = T_BOUNDS):
        self.estimator = estimator
        self.bounds = bounds

    @property
    def method(self) -> str:
        return f"{self.estimator.method} (temperature-scaled)"

    @property
    def task(self):
        return self.estimator.task

    @property
    def lm(self):
        return self.estimator.lm

    def fit(self, data) -> "TemperatureScaled":
        """Fit the temperature on labeled validation ``data`` (never the training data: there a fitted model
        looks better calibrated than it is)."""
        if isinstance(self.estimator, TemperatureScaled):
            raise LmtuneError("this run is temperature-scaled already; calibrate the original run instead")
        if not hasattr(self.estimator, "label_logits"):
            raise LmtuneError(f"{type(self.estimator).__name__} has no label_logits; temperature scaling "
                              "needs a method that produces logits")
        logits, _, y, ds = self.estimator.label_logits(data, labeled=True)
        return self.fit_logits(logits, y, ds)

    def fit_logits(self, logits, y, ds=None) -> "TemperatureScaled":
        """Fit the temperature on validation logits already computed, (N, K), and their labels (N,)."""
        self.temperature_, self.at_bound_ = fit_temperature(logits, y, self.bounds)
        self.val_nll_ = {"before": temperature_nll(logits, y, 1.0),
                         "after": temperature_nll(logits, y, self.temperature_)}
        self.val_ = None if ds is None else {"path": ds.path, "n": len(ds), "sha256": ds.content_hash()}
        return self

    def _t(self) -> float:
        if not hasattr(self, "temperature_"):
            raise LmtuneError("this TemperatureScaled is not fitted yet: call fit(validation_data) first")
        return self.temperature_

    def label_logits(self, data, labeled: bool = False, base: bool = False):
        """As the wrapped method's ``label_logits``, with the adapted logits divided by the temperature (the
        base model's logits, when asked for, are left alone)."""
        t = self._t()
        logits, base_logits, y, ds = self.estimator.label_logits(data, labeled=labeled, base=base)
        return logits / t, base_logits, y, ds

    def uncertainty(self, data):
        """The wrapped method's per-record uncertainty (when it has one), its entropy recomputed after
        scaling."""
        t = self._t()
        inner = getattr(self.estimator, "uncertainty", None)
        if not callable(inner):
            logits, _, _, ds = self.estimator.label_logits(data)
            return logits / t, {}, ds
        logits, extras, ds = inner(data)
        logits = logits / t
        extras = dict(extras)
        if "entropy" in extras:
            from lmtune.bayes_linear import entropy

            extras["entropy"] = entropy(log_softmax(logits, axis=1))
        return logits, extras, ds

    def predict_proba(self, data) -> np.ndarray:
        from lmtune.methods.base import softmax

        return softmax(self.label_logits(data)[0])

    def predict(self, data) -> np.ndarray:
        return self.predict_proba(data).argmax(axis=1)

    # -- persistence ----------------------------------------------------------------------------------

    def card(self) -> dict:
        """What the run card records under ``"calibration"``."""
        return {"method": "temperature", "temperature": self._t(), "at_bound": self.at_bound_,
                "bounds": [float(b) for b in self.bounds], "val": self.val_, "val_nll": self.val_nll_}

    def save(self, path) -> Path:
        """The wrapped method's run folder, its card extended with ``"calibration"``; written atomically.

        The wrapped estimator must be able to save itself (a freshly fitted one); to calibrate a run folder,
        use :func:`calibrate_run`, which copies the folder instead.
        """
        from lmtune.runs import check_run_destination

        check_run_destination(path)
        self._t()
        with tempfile.TemporaryDirectory(prefix="lmtune-calibrated-") as tmp:
            inner = Path(self.estimator.save(Path(tmp) / "run"))
            return _calibrated_copy(inner, self.card(), path)

    @classmethod
    def from_card(cls, card: dict, estimator) -> "TemperatureScaled":
        """Wrap ``estimator`` (loaded from the same run folder) with the calibration its card records."""
        c = card["calibration"]
        if c.get("method") != "temperature":
            raise ValueError(f"unknown calibration {c.get('method')!r}")
        ts = cls(estimator, bounds=tuple(c.get("bounds", T_BOUNDS)))
        ts.temperature_ = float(c["temperature"])
        ts.at_bound_ = bool(c.get("at_bound", False))
        ts.val_nll_, ts.val_ = c.get("val_nll"), c.get("val")
        return ts


def calibration_summary(estimator, logits, y, labels, val=None, n_bins: int = 15) -> tuple[dict, dict]:
    """Calibration of one fitted method on test logits, and of its temperature-scaled variant when
    validation data is given: what the comparison report shows.

    Parameters
    ----------
    estimator
        The fitted method (used only to compute the validation logits).
    logits : np.ndarray, shape (N, K)
        Its test logits.
    y : np.ndarray, shape (N,)
        Test labels.
    labels : list of str
    val : Dataset or None
        Labeled validation data for the temperature.
    n_bins : int

    Returns
    -------
    fields : dict
        ``{"temperature", "ts_nll", "ts_ece", "ts_brier"}`` (None without ``val``).
    entry : dict
        ``{"ece", "reliability", "temperature", "at_bound", "val_nll", "ts_ece", "ts_reliability"}``, the
        reliability bins as :func:`lmtune.metrics.reliability` gives them (the last five None without
        ``val``).
    """
    from lmtune.methods.base import softmax
    from lmtune.metrics import classification_report, ece, reliability

    probs = softmax(logits)
    entry = {"ece": ece(y, probs, n_bins), "reliability": reliability(y, probs, n_bins), "temperature": None,
             "at_bound": None, "val_nll": None, "ts_ece": None, "ts_reliability": None}
    fields = dict.fromkeys(("temperature", "ts_nll", "ts_ece", "ts_brier"))
    if val is not None:
        ts = TemperatureScaled(estimator).fit(val)
        scaled = softmax(np.asarray(logits) / ts.temperature_)
        m = classification_report(y, scaled, labels, n_bins=n_bins)
        fields.update(temperature=ts.temperature_, ts_nll=m["nll"], ts_ece=m["ece"], ts_brier=m["brier"])
        entry.update(temperature=ts.temperature_, at_bound=ts.at_bound_, val_nll=ts.val_nll_, ts_ece=m["ece"],
                     ts_reliability=reliability(y, scaled, n_bins))
    return fields, entry


def _calibrated_copy(src: Path, calibration: dict, dest) -> Path:
    """Write the run folder ``src`` to ``dest`` (atomically) with ``calibration`` added to its card."""
    from lmtune.runs import CARD, read_card, write_run

    src = Path(src)
    card = read_card(src)
    card["calibration"] = calibration

    def copy(folder: Path) -> None:
        for f in src.iterdir():
            if f.name == CARD:
                continue
            if f.is_dir():
                shutil.copytree(f, folder / f.name)
            else:
                shutil.copy2(f, folder / f.name)

    return write_run(dest, card, copy)


def calibrate_run(run, val, out, model=None, **kwargs) -> TemperatureScaled:
    """Temperature-scale the run folder ``run`` on validation data ``val`` and write the calibrated run to ``out``.

    Parameters
    ----------
    run : str or Path
        A run folder (not a calibrated one).
    val : Dataset or str
        Labeled validation data.
    out : str or Path
        The calibrated run folder (``run`` itself is allowed: it is replaced atomically).
    model : LM or str, optional
        The base model; by default the run's.
    **kwargs
        Passed to :func:`lmtune.load_run` (``batch_size``, ``progress``, ``cache``).

    Returns
    -------
    TemperatureScaled
        Fitted, with ``path_`` the written folder.
    """
    from lmtune.methods import load_run
    from lmtune.runs import check_run_destination

    check_run_destination(out)
    ts = TemperatureScaled(load_run(run, model=model, **kwargs)).fit(val)
    ts.path_ = _calibrated_copy(Path(run), ts.card(), out)
    return ts


# --------------------------------------------------------------------------- #
# reliability diagrams
# --------------------------------------------------------------------------- #
def _bins(rel: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Edges, counts, accuracy and confidence of a reliability dict (JSON's None read back as NaN)."""
    def arr(key):
        return np.array([np.nan if v is None else v for v in rel[key]], dtype=np.float64)

    return arr("bin_edges"), np.asarray(rel["counts"], dtype=np.int64), arr("accuracy"), arr("confidence")


def _draw_panel(ax, ax_counts, rel: dict, title: str, ece: float | None) -> None:
    edges, counts, acc, conf = _bins(rel)
    width = np.diff(edges)
    full = counts > 0
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.4", linewidth=1, label="perfect calibration")
    ax.bar(edges[:-1][full], acc[full], width=width[full], align="edge", color="tab:blue", edgecolor="white",
           linewidth=0.5, label="accuracy")
    # the gap between the bar and the bin's mean confidence: what the ECE weighs by the bin's share
    ax.bar(edges[:-1][full], conf[full] - acc[full], bottom=acc[full], width=width[full], align="edge",
           color="tab:red", alpha=0.25, edgecolor="tab:red", linewidth=0.5, label="gap to mean confidence")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title + ("" if ece is None else f"\nECE {ece:.4f} ({len(counts)} bins, n={int(counts.sum())})"),
                 fontsize=10)
    ax.legend(loc="upper left", fontsize=7)
    ax.grid(True, alpha=0.3)
    ax_counts.bar(edges[:-1], counts, width=width, align="edge", color="0.55", edgecolor="white", linewidth=0.5)
    for x, w, n in zip(edges[:-1], width, counts):
        if n:
            ax_counts.annotate(str(n), (x + w / 2, n), ha="center", va="bottom", fontsize=6)
    ax_counts.set_xlim(0, 1)
    ax_counts.set_ylim(0, max(1, counts.max()) * 1.3)
    ax_counts.set_xlabel("confidence (top-label probability)")
    ax_counts.set_ylabel("records")


def reliability_figure(panels: list[tuple[str, dict, float | None]]):
    """Reliability diagrams side by side, one per panel.

    Parameters
    ----------
    panels : list of (title, reliability, ece)
        ``reliability`` as :func:`lmtune.metrics.reliability` returns it (arrays or JSON lists);
        ``ece`` goes into the title.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    if not panels:
        raise ValueError("no reliability panels to draw")
    fig = Figure(figsize=(4.6 * len(panels), 5.2), dpi=110)
    grid = fig.add_gridspec(2, len(panels), height_ratios=(3.2, 1.0), hspace=0.08)
    for i, (title, rel, ece) in enumerate(panels):
        ax = fig.add_subplot(grid[0, i])
        ax_counts = fig.add_subplot(grid[1, i], sharex=ax)
        ax.tick_params(labelbottom=False)
        _draw_panel(ax, ax_counts, rel, title, ece)
    fig.subplots_adjust(left=0.1 / len(panels) + 0.04, right=0.98, top=0.88, bottom=0.1, wspace=0.25)
    return fig


def reliability_overlay(curves: list[tuple[str, dict, float | None]], title: str = "Reliability"):
    """Several methods' reliability curves on one set of axes: accuracy against mean confidence of every
    non-empty bin, the marker's area proportional to the bin's records; ECE in the legend.

    Parameters
    ----------
    curves : list of (label, reliability, ece)
    title : str

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 5.4), dpi=110)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.4", linewidth=1, label="perfect calibration")
    palette = colormaps["tab10"]
    for i, (label, rel, ece) in enumerate(curves):
        _, counts, acc, conf = _bins(rel)
        full = counts > 0
        share = counts[full] / max(1, counts.sum())
        colour = palette(i % 10)
        ax.plot(conf[full], acc[full], color=colour, linewidth=1.2, marker=None,
                label=label + ("" if ece is None else f" (ECE {ece:.3f})"))
        ax.scatter(conf[full], acc[full], s=10 + 400 * share, color=colour, alpha=0.6, zorder=3)
    ax.set_xlim(-0.02, 1.02)  # points at accuracy 1 stay visible
    ax.set_ylim(-0.02, 1.04)
    ax.set_xlabel("mean confidence in bin")
    ax.set_ylabel("accuracy in bin")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    return fig

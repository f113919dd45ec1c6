"""Evaluate a fitted estimator on labeled data, with the flip analysis against the zero-shot model.

The zero-shot probabilities come from the same feature pass (``softmax(L)``), so comparing any
label-token method with its base model costs nothing extra. A *flip* is a record whose predicted label
changed; flips are split into wrong-to-right, right-to-wrong and wrong-to-wrong (changed, still wrong),
with examples, following the "accuracy is not all you need" argument (Dutta et al. 2024) that equal
accuracy can hide many changed answers.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from lmtune.methods.base import as_dataset, softmax
from lmtune.metrics import classification_report, flips, to_jsonable

SNIPPET = 160


def _snippet(task, record: dict) -> str:
    text = " | ".join(str(record.get(f, "")) for f in task._template.fields)
    return text if len(text) <= SNIPPET else text[: SNIPPET - 3] + "..."


def evaluate(estimator, data, *, n_bins: int = 15, n_examples: int = 5) -> dict:
    """Metrics of ``estimator`` on labeled ``data``; for adapted methods, also the zero-shot metrics and
    the flip analysis.

    Returns
    -------
    dict
        ``{"method", "model", "data": {"path", "n", "sha256"}, "metrics": {...}}`` plus, unless the
        estimator is the zero-shot one, ``"zero_shot": {...}`` and ``"flips": {...}``. JSON-able and stable:
        the keys are always present in this order.
    """
    ds = as_dataset(data)
    logits, base_logits, y, ds = estimator.label_logits(ds, labeled=True, base=estimator.method != "zero-shot")
    return evaluate_logits(estimator, ds, logits, base_logits, y, n_bins=n_bins, n_examples=n_examples)


def evaluate_logits(estimator, ds, logits: np.ndarray, base_logits: np.ndarray | None, y: np.ndarray, *,
                    n_bins: int = 15, n_examples: int = 5) -> dict:
    """:func:`evaluate` from logits already computed by ``estimator.label_logits(ds, labeled=True,
    base=...)``, for callers that need the logits too (the calibration report)."""
    is_base = estimator.method == "zero-shot"
    task = estimator.task
    probs = softmax(logits)
    out = {"method": estimator.method, "model": estimator.lm.name,
           "data": {"path": ds.path, "n": len(ds), "sha256": ds.content_hash()},
           "metrics": classification_report(y, probs, task.labels, n_bins=n_bins)}
    if not is_base:
        base = softmax(base_logits)
        out["zero_shot"] = classification_report(y, base, task.labels, n_bins=n_bins)
        out["flips"] = flip_analysis(task, ds, y, base, probs, n_examples)
    return to_jsonable(out)


def flip_analysis(task, ds, y: np.ndarray, base_probs: np.ndarray, probs: np.ndarray, n_examples: int) -> dict:
    """Counts of changed answers by direction, with up to ``n_examples`` records of each kind."""
    base_pred, pred = base_probs.argmax(1), probs.argmax(1)
    f = flips(y, base_pred, pred)
    labels = task.labels
    examples = {}
    for kind, idx in f["indices"].items():
        examples[kind] = [{"line": ds.lines[i], "text": _snippet(task, ds.records[i]), "label": labels[y[i]],
                           "zero_shot": labels[base_pred[i]], "adapted": labels[pred[i]],
                           "p_zero_shot": float(base_probs[i, base_pred[i]]), "p_adapted": float(probs[i, pred[i]])}
                          for i in idx[:n_examples]]
    counts = {k: v for k, v in f.items() if k != "indices"}
    return {**counts, "examples": examples}


def predict_records(estimator, data) -> Iterator[dict]:
    """One JSON-able dict per record, in input order: its line, ``id`` when present, the predicted label,
    every label's probability and, for an estimator with a posterior, ``"uncertainty"``.

    An estimator reports uncertainty through a method ``uncertainty(data) -> (logits (N, K), {name: (N,)
    array}, dataset)`` (one feature pass; an empty dict when it has no posterior); each record then gets
    ``{"uncertainty": {name: value}}`` (for example the predictive entropy and the logits' posterior
    standard deviation).
    """
    unc = getattr(estimator, "uncertainty", None)
    if callable(unc):
        logits, extras, ds = unc(data)
    else:
        logits, _, _, ds = estimator.label_logits(data)
        extras = {}
    probs = softmax(logits)
    labels = estimator.task.labels
    for i, p in enumerate(probs):
        row = {"line": ds.lines[i]}
        if "id" in ds.records[i]:
            row["id"] = ds.records[i]["id"]
        row["label"] = labels[int(p.argmax())]
        row["probabilities"] = {lab: float(v) for lab, v in zip(labels, p)}
        if extras:
            row["uncertainty"] = {name: float(v[i]) for name, v in extras.items()}
        yield row

"""Compare adaptation methods on one dataset, on every axis on which they trade against each other.

No method wins everywhere. The axes are the ones seed 004 names for parameter-efficient fine-tuning, each
measured here rather than quoted:

* **parameter efficiency**: trainable parameters, their share of the base model, and the bytes a run
  needs on disk beside the base model (``adapter_bytes``);
* **memory**: the peak resident memory of the fit (:class:`lmtune.profiling.PeakMemory`), and how far above
  the resident size at its start it went (``fit_memory_bytes``);
* **quality**: accuracy, macro-F1, NLL, ECE and Brier on the test set (:func:`lmtune.evaluate.evaluate`),
  and how many answers changed against the zero-shot model;
* **training speed**: wall time of ``fit``;
* **inference cost**: seconds per example of a fresh estimator loaded from the saved run, and for the
  LoRA family also of the merged model (:func:`lmtune.merge.merged_lm`);
* **calibration**: ECE, NLL and Brier with a reliability diagram per method and, when validation data is
  given, the same after temperature scaling on it (:mod:`lmtune.calibration`), the baseline a method with a
  posterior (``NAME+MODE``, e.g. ``closed-form+exact``: the method fitted with ``bayes=MODE``) must beat.

Design
------
* **One loaded base model for every method.** Methods never leave the base changed (see
  :mod:`lmtune.methods.tuned`), so a comparison loads the model once and all rows share its weights.
* **Cold fits.** Every fit runs with the feature cache off: a closed-form fit on cached features would
  time the disk, not the method, and a second ``compare`` would report a different training time from the
  first. Evaluation keeps the cache (when ``cache``), so the zero-shot logits every method's flip
  analysis needs are computed once.
* **Latency from the saved run, cache off.** The inference measurement reloads each run with
  :func:`lmtune.load_run` on the same base, so it includes whatever loading the run needs per call (a PEFT
  adapter is attached for every ``predict_proba``), and never reads features from disk. The median of 3
  repeats damps one-off costs; it is divided by the number of examples.
* **Stable, flat rows.** Every row has the keys of :data:`ROW_KEYS` in that order, with None where a key
  does not apply, and rows follow the order of :data:`lmtune.methods.METHODS`, whatever the order asked
  for, so reports of different runs line up and the CSV is rectangular.
* **Atomic reports.** Each file is written to a temporary name in ``out/`` and renamed.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

from lmtune.errors import LmtuneError
from lmtune.runs import atomic_write, write_text

ROW_KEYS = (
    "method",
    # quality
    "accuracy", "macro_f1", "nll", "ece", "brier", "flipped", "net_gain",
    # calibration: temperature scaling fitted on the validation data (None without it)
    "temperature", "ts_nll", "ts_ece", "ts_brier",
    # parameter efficiency
    "trainable_params", "base_params", "trainable_share", "adapter_bytes",
    # training speed
    "train_seconds", "train_steps",
    # memory
    "peak_rss_bytes", "start_rss_bytes", "fit_memory_bytes", "cuda_peak_bytes", "memory_method",
    # inference cost
    "latency_ms", "merged_latency_ms", "merged_max_prob_diff",
    # forgetting: change of the held-text LM loss (the suite's first lm task; None without a suite)
    "forget_lm_delta",
    "run",
)
REPORT_FILES = ("report.md", "report.csv", "report.json", "quality_vs_params.png", "quality_vs_time.png",
                "reliability.png")
LATENCY_REPEATS = 3
ECE_BINS = 15  # equal-width confidence bins of the ECE and the reliability diagrams


def split_method(name: str) -> tuple[str, str | None]:
    """``"closed-form+exact"`` -> ``("closed-form", "exact")``: a method and the posterior (``bayes``) it is
    fitted with; ``("lora", None)`` for a plain name."""
    base, _, bayes = name.partition("+")
    return base, (bayes or None)


def check_methods(methods, options: dict | None = None) -> list[str]:
    """The method names in ``methods`` (a list or a comma-separated string), checked, in registry order.

    A name is a method of :data:`lmtune.methods.METHODS`, or ``NAME+MODE`` for the method fitted with
    ``bayes=MODE`` (one of its ``bayes_modes``); each posterior follows its plain method.

    Raises
    ------
    LmtuneError
        An unknown or repeated name, or ``options`` for a method not being compared.
    """
    from lmtune.methods import METHODS

    names = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else [str(m) for m in methods]
    names = [m for m in names if m]
    unknown = [m for m in names if split_method(m)[0] not in METHODS]
    if unknown:
        posteriors = [f"{n}+{b}" for n, cls in METHODS.items() for b in getattr(cls, "bayes_modes", ())]
        raise LmtuneError(f"unknown method{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                          f"known methods: {', '.join(METHODS)}"
                          + (f"; with a posterior: {', '.join(posteriors)}" if posteriors else ""))
    for m in names:
        base, bayes = split_method(m)
        modes = getattr(METHODS[base], "bayes_modes", ())
        if bayes is not None and bayes not in modes:
            raise LmtuneError(f"{m}: {base} " + (f"offers the posteriors {', '.join(modes)}, not {bayes}" if modes
                                                 else "has no posterior"))
    if not names:
        raise LmtuneError(f"no methods to compare; known methods: {', '.join(METHODS)}")
    twice = sorted({m for m in names if names.count(m) > 1})
    if twice:
        raise LmtuneError(f"method {', '.join(twice)} listed more than once")
    stray = sorted(set(options or {}) - set(names))
    if stray:
        raise LmtuneError(f"options given for {', '.join(stray)}, which {'is' if len(stray) == 1 else 'are'} "
                          f"not among the compared methods ({', '.join(names)})")
    order = list(METHODS)

    def rank(m):
        base, bayes = split_method(m)
        modes = getattr(METHODS[base], "bayes_modes", ())
        return order.index(base), -1 if bayes is None else modes.index(bayes)

    return sorted(names, key=rank)


def route_options(given: dict, methods, training: Iterable[str]) -> dict[str, dict]:
    """Hand options given once for the whole comparison to the methods that take them.

    Parameters
    ----------
    given : dict
        ``{option: value}``, e.g. ``{"epochs": 1, "rank": 4}``.
    methods : list of str
        The compared methods.
    training : iterable of str
        The training options every gradient method takes (``lmtune.cli.TRAINING_OPTIONS``); the others go
        to the methods whose ``options`` name them (``rank`` to lora only).

    Returns
    -------
    dict
        ``{method: {option: value}}`` for the methods that receive at least one. A ``checkpoint_dir`` gets
        one subfolder per method, so no method resumes from another's checkpoint.

    Raises
    ------
    LmtuneError
        An option that none of the compared methods takes.
    """
    from lmtune.methods import METHODS
    from lmtune.methods.tuned import TunedClassifier

    training = set(training)
    out: dict[str, dict] = {}
    used = set()
    for name in methods:
        cls = METHODS[split_method(name)[0]]
        if not issubclass(cls, TunedClassifier):
            continue
        mine = {k: v for k, v in given.items() if k in training or k in cls.options}
        if mine.get("checkpoint_dir"):
            mine["checkpoint_dir"] = str(Path(mine["checkpoint_dir"]) / name)
        used.update(mine)
        if mine:
            out[name] = mine
    unused = [k for k in given if k not in used]
    if unused:
        raise LmtuneError(f"{', '.join(unused)} appl{'ies' if len(unused) == 1 else 'y'} to none of the compared "
                          f"methods ({', '.join(methods)})")
    return out


def _data_info(ds) -> dict:
    return {"path": ds.path, "n": len(ds), "sha256": ds.content_hash()}


def environment(lm) -> dict:
    """Where the measurements were taken: versions, threads, CPU and device."""
    import torch

    import lmtune
    from lmtune.profiling import cpu_name

    cuda = lm.device.type == "cuda"
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_name(),
            "cpu_count": os.cpu_count(), "device": str(lm.device),
            "gpu": torch.cuda.get_device_name(lm.device) if cuda else None,
            "python": platform.python_version(), "platform": platform.platform(), "lmtune": lmtune.__version__}


def trainable_params(est) -> int:
    """Numbers the fitted estimator learned: 0 for zero-shot, d*K (+K with the intercept) for closed-form,
    the trained parameter count for gradient methods."""
    if hasattr(est, "fit_info_"):
        return int(est.fit_info_["trainable_params"])
    if hasattr(est, "weight_"):
        return int(est.weight_.size + (est.bias_.size if est.fit_intercept else 0))
    return 0


def run_bytes(folder: Path) -> int:
    """Bytes of a run folder's learned state: every file but ``card.json``."""
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file() and f.name != "card.json")


def _seconds_per_example(est, data, repeats: int = LATENCY_REPEATS):
    """Median over ``repeats`` of the wall time of ``predict_proba(data)``, per example; and the last output."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        probs = est.predict_proba(data)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / len(data), probs


def _fit(est, train, val):
    from lmtune.methods.tuned import TunedClassifier

    if isinstance(est, TunedClassifier):
        return est.fit(train, val=val)
    return est.fit(train)


def _build(cls, lm, task, shared: dict, opts: dict):
    try:
        return cls(lm, task, **{**shared, **opts})
    except TypeError as e:  # an option the method does not take, named by Python's message
        raise LmtuneError(f"{cls.method}: {e}") from None


def _measure(name: str, lm, task, train, test, *, val=None, options: dict | None = None, runs_dir: Path,
            shared: dict, latency_data=None, suite=None, base_scores: dict | None = None,
            log: Callable[[str], None] = lambda msg: None) -> tuple:
    """Fit, save, evaluate and time one method; its row of the comparison (keys :data:`ROW_KEYS`) and its
    calibration entry (:func:`lmtune.calibration.calibration_summary`), and its forgetting report
    (:func:`lmtune.forgetting.forgetting`, None without a ``suite``; the base scores are kept in
    ``base_scores`` for the next method)."""
    from lmtune.calibration import calibration_summary
    from lmtune.evaluate import evaluate_logits
    from lmtune.merge import MERGEABLE, merged_lm
    from lmtune.methods import METHODS, ZeroShotClassifier, load_run
    from lmtune.profiling import PeakMemory, release_free_memory

    row = dict.fromkeys(ROW_KEYS)
    row["method"] = name
    base_name, bayes = split_method(name)
    est = _build(METHODS[base_name], lm, task, shared, {**(options or {}), **({"bayes": bayes} if bayes else {})})
    cache = est.cache
    est.cache = False  # cold fit: see the module docstring
    release_free_memory()
    log(f"{name}: fitting on {len(train)} records ...")
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        _fit(est, train, val)
        row["train_seconds"] = time.perf_counter() - t0
    est.cache = cache
    batch_size = est.batch_size  # the fresh estimator below predicts in the same batches
    row.update(peak_rss_bytes=mem.peak_rss_bytes, start_rss_bytes=mem.start_rss_bytes,
               fit_memory_bytes=mem.delta_bytes, cuda_peak_bytes=mem.cuda_peak_bytes, memory_method=mem.method)
    result = getattr(est, "train_result_", None)
    row["train_steps"] = result.steps if result is not None else None

    run = est.save(runs_dir / name)
    row["run"] = str(run)
    row["adapter_bytes"] = run_bytes(run)
    n = trainable_params(est)
    base = sum(p.numel() for p in lm.model.parameters())
    row.update(trainable_params=n, base_params=int(base), trainable_share=n / base)

    log(f"{name}: evaluating on {len(test)} records ...")
    logits, base_logits, y, ds = est.label_logits(test, labeled=True, base=est.method != "zero-shot")
    ev = evaluate_logits(est, ds, logits, base_logits, y, n_bins=ECE_BINS)
    m = ev["metrics"]
    row.update({k: m[k] for k in ("accuracy", "macro_f1", "nll", "ece", "brier")})
    if "flips" in ev:
        row.update(flipped=ev["flips"]["flipped"], net_gain=ev["flips"]["net_gain"])
    if val is not None:
        log(f"{name}: temperature scaling on {len(val)} validation records ...")
    fields, calib = calibration_summary(est, logits, y, task.labels, val=val, n_bins=ECE_BINS)
    row.update(fields)
    forget = None
    if suite is not None:
        from lmtune.forgetting import forgetting

        log(f"{name}: scoring the forgetting suite ...")
        forget = forgetting(est, suite, base_scores=base_scores)
        lm_tasks = []
        for tname, t in forget["tasks"].items():
            base_scores.setdefault(tname, t["base"])
            if t["type"] == "lm":
                lm_tasks.append(t)
        row["forget_lm_delta"] = lm_tasks[0]["delta"]["loss"] if lm_tasks else None
    del est
    release_free_memory()

    if latency_data is not None:
        log(f"{name}: timing inference on {len(latency_data)} records ...")
        fresh = load_run(run, model=lm, cache=False, progress=False, batch_size=batch_size)
        latency, probs = _seconds_per_example(fresh, latency_data)
        row["latency_ms"] = 1e3 * latency
        if name in MERGEABLE:
            merged = ZeroShotClassifier(merged_lm(fresh), fresh.task, cache=False, progress=False,
                                        batch_size=batch_size).fit()
            latency, merged_probs = _seconds_per_example(merged, latency_data)
            row["merged_latency_ms"] = 1e3 * latency
            row["merged_max_prob_diff"] = float(abs(merged_probs - probs).max())
            del merged
        del fresh
        release_free_memory()
    return row, calib, forget


def compare(model, task, train, test, methods, *, val=None, options: dict | None = None, out=None,
            progress: bool | None = None, latency_examples: int = 64, batch_size: int | None = None,
            cache: bool = True, forgetting_suite=None, log: Callable[[str], None] | None = None) -> dict:
    """Fit each method on ``train``, evaluate it on ``test``, and measure its cost.

    Parameters
    ----------
    model : LM or str
        The base model every method adapts (loaded once).
    task : ClassificationTask
    train, test : Dataset or str
        Labeled data, or anything :func:`lmtune.data.open_data` reads.
    methods : list of str or str
        Method names from :data:`lmtune.methods.METHODS` (a list or ``"zero-shot,lora"``).
    val : Dataset, str or None
        Validation data for the gradient methods (best epoch), and for the temperature of every method's
        temperature-scaled variant.
    options : dict or None
        ``{method: {parameter: value}}``: constructor arguments of single methods (``{"lora": {"rank": 4}}``).
    out : str, Path or None
        Folder for the runs (``out/runs/<method>``) and the reports (see :func:`write_reports`). None keeps
        the runs in a temporary folder that is deleted afterwards, and writes no report.
    progress : bool or None
        Progress bars of the methods; None shows them only on a terminal.
    latency_examples : int
        Test records (the first ones) for the inference timing; 0 skips it.
    batch_size : int or None
        Passed to every method (for gradient methods it is also the training batch); None keeps each default.
    cache : bool
        Use the on-disk feature cache while evaluating (fits always run cold).
    forgetting_suite : str, Path, list or None
        A forgetting suite (:mod:`lmtune.forgetting`; ``"builtin"`` for the built-in one): every method's
        run is also scored on its tasks against the base model, and the report gains a forgetting column
        (the held-text LM loss change) and section.
    log : callable or None
        Called with a line of text as each step begins.

    Returns
    -------
    dict
        JSON-able: ``{"model", "model_fingerprint", "task", "train", "val", "test"`` (each ``{"path", "n",
        "sha256"}``, ``val`` None when not given), ``"latency_examples", "rows", "calibration", "environment",
        "seconds"}``; ``rows`` holds one dict per method with the keys :data:`ROW_KEYS`; ``calibration`` is
        ``{"n_bins", "methods": {method: entry}}`` with the reliability bins of every method (and of its
        temperature-scaled variant), see :func:`lmtune.calibration.calibration_summary`.
    """
    from lmtune.data import Dataset, open_data
    from lmtune.models import as_lm
    from lmtune.runs import check_run_destination

    names = check_methods(methods, options)
    suite = None
    if forgetting_suite is not None:
        from lmtune.forgetting import read_suite

        suite = forgetting_suite if isinstance(forgetting_suite, list) else read_suite(forgetting_suite)
    if not isinstance(latency_examples, int) or latency_examples < 0:
        raise LmtuneError(f"latency_examples must be a whole number >= 0, got {latency_examples!r}")
    # Read and check everything before the model loads and minutes of fitting begin.
    train_ds, test_ds = (d if isinstance(d, Dataset) else open_data(d) for d in (train, test))
    val_ds = None if val is None else val if isinstance(val, Dataset) else open_data(val)
    log = log or (lambda msg: None)
    t_start = time.perf_counter()
    tmp = None
    if out is None:
        tmp = runs_dir = Path(tempfile.mkdtemp(prefix="lmtune-compare-"))
    else:
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise LmtuneError(f"{out} exists and is not a folder; choose another --out")
        runs_dir = out / "runs"
        for name in names:
            check_run_destination(runs_dir / name)
    try:
        lm = as_lm(model)
        task.encode(lm.tokenizer, test_ds, labeled=True)  # a bad test file fails now, not after the fits
        shared = {"progress": progress, "cache": cache}
        if batch_size is not None:
            shared["batch_size"] = batch_size
        n_lat = min(latency_examples, len(test_ds))
        latency_data = test_ds.subset(range(n_lat)) if n_lat else None
        base_scores: dict = {}
        measured = [_measure(name, lm, task, train_ds, test_ds, val=val_ds, options=(options or {}).get(name),
                             runs_dir=runs_dir, shared=shared, latency_data=latency_data, suite=suite,
                             base_scores=base_scores, log=log)
                    for name in names]
        rows = [row for row, _, _ in measured]
        calibration = {"n_bins": ECE_BINS, "methods": {row["method"]: c for row, c, _ in measured}}
        forgetting = None if suite is None else {row["method"]: f for row, _, f in measured}
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if tmp is not None:
        for r in rows:
            r["run"] = None
    elif out is not None:
        for r in rows:  # relative to the report, so the folder can be moved
            r["run"] = os.path.relpath(r["run"], out)
    result = {"model": lm.name, "model_fingerprint": lm.fingerprint, "task": task.to_dict(),
              "train": _data_info(train_ds), "val": None if val_ds is None else _data_info(val_ds),
              "test": _data_info(test_ds), "latency_examples": n_lat, "rows": rows, "calibration": calibration, "forgetting": forgetting,
              "environment": environment(lm), "seconds": time.perf_counter() - t_start}
    from lmtune.metrics import to_jsonable

    result = to_jsonable(result)
    if out is not None:
        write_reports(result, out)
    return result


# -- writers --------------------------------------------------------------------------------------------

def rows_csv(rows: list[dict]) -> str:
    """The rows as CSV with the :data:`ROW_KEYS` header; None is an empty cell, floats keep every digit."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(ROW_KEYS), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if r.get(k) is None else r[k] for k in ROW_KEYS})
    return buf.getvalue()


def write_reports(result: dict, out) -> dict[str, Path]:
    """Write ``report.md``, ``report.csv``, ``report.json``, the two plots, the combined reliability diagram
    and one per method (``reliability/<method>.png``) into ``out``; their paths."""
    from lmtune.calibration import reliability_figure, reliability_overlay
    from lmtune.report import compare_markdown, plot_quality

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = result["rows"]
    paths = {
        "report.md": write_text(out / "report.md", compare_markdown(result)),
        "report.csv": write_text(out / "report.csv", rows_csv(rows)),
        "report.json": write_text(out / "report.json", json.dumps(result, indent=2, allow_nan=False) + "\n"),
    }
    for fname, key, xlabel, title in (
            ("quality_vs_params.png", "trainable_params", "trainable parameters (log scale)",
             "Test accuracy against trainable parameters"),
            ("quality_vs_time.png", "train_seconds", "training time, s (log scale)",
             "Test accuracy against training time")):
        fig = plot_quality(rows, key, xlabel, title)
        paths[fname] = atomic_write(out / fname, lambda tmp: fig.savefig(tmp, format="png"))
    calib = result.get("calibration") or {"methods": {}}
    curves = []
    for name, c in calib["methods"].items():
        panels = [(name, c["reliability"], c["ece"])]
        curves.append((name, c["reliability"], c["ece"]))
        if c.get("ts_reliability"):
            panels.append((f"{name}, temperature-scaled (T = {c['temperature']:.3g})", c["ts_reliability"],
                           c["ts_ece"]))
        fig = reliability_figure(panels)
        (out / "reliability").mkdir(exist_ok=True)
        fname = f"reliability/{name}.png"
        paths[fname] = atomic_write(out / fname, lambda tmp: fig.savefig(tmp, format="png"))
    fig = reliability_overlay(curves, title="Reliability on the test set (marker area: share of records)")
    paths["reliability.png"] = atomic_write(out / "reliability.png", lambda tmp: fig.savefig(tmp, format="png"))
    return paths

"""Temperature scaling, reliability diagrams and the calibration section of ``lmtune compare``."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import lmtune
from lmtune.calibration import (TemperatureScaled, fit_temperature, reliability_figure, reliability_overlay,
                                temperature_nll)
from lmtune.cli import main
from lmtune.compare import REPORT_FILES, ROW_KEYS, check_methods, compare, route_options
from lmtune.data import open_data, write_jsonl
from lmtune.errors import LmtuneError
from lmtune.methods.base import softmax
from lmtune.metrics import classification_report, reliability

TEMPLATE = "Review: {text}\nIs this review positive? Answer yes or no."
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _sample(t0, n=20_000, k=4, seed=0):
    """Logits and labels drawn from softmax(logits / t0): the calibrating temperature is t0."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k)) * 3.0
    p = softmax(logits / t0)
    y = (p.cumsum(1) > rng.uniform(size=(n, 1))).argmax(1)
    return logits, y


@pytest.mark.parametrize("t0", [0.5, 1.0, 2.5])
def test_temperature_scaling_recovers_a_known_temperature(t0):
    logits, y = _sample(t0)
    t, at_bound = fit_temperature(logits, y)
    assert t == pytest.approx(t0, rel=0.05) and not at_bound
    # it is the minimiser: a brute-force scan finds nothing better
    scan = np.exp(np.linspace(np.log(0.2), np.log(5), 401))
    assert temperature_nll(logits, y, t) <= min(temperature_nll(logits, y, s) for s in scan) + 1e-9


def test_never_raises_the_nll_on_its_own_fit_data():
    rng = np.random.default_rng(1)
    for trial in range(20):
        n = int(rng.integers(3, 60))
        logits = rng.normal(size=(n, 3)) * rng.uniform(0.1, 10)
        y = rng.integers(0, 3, size=n)
        t, _ = fit_temperature(logits, y)
        assert temperature_nll(logits, y, t) <= temperature_nll(logits, y, 1.0) + 1e-12


def test_perfectly_separated_data_stops_at_the_bound():
    logits = np.array([[3.0, 0.0], [0.0, 3.0], [5.0, 1.0]])
    t, at_bound = fit_temperature(logits, np.array([0, 1, 0]))
    assert at_bound and t == pytest.approx(0.01, rel=1e-3)


def test_input_errors():
    with pytest.raises(ValueError, match="logits must be 2-D"):
        fit_temperature(np.zeros(3), np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="class indices outside"):
        fit_temperature(np.zeros((2, 2)), np.array([0, 2]))
    with pytest.raises(ValueError, match="bounds must satisfy"):
        fit_temperature(np.zeros((2, 2)), np.array([0, 1]), bounds=(2.0, 3.0))


class _FixedLogits:
    """A stand-in estimator with known logits, for the wrapper's arithmetic."""

    method = "fixed"
    task = lm = None

    def __init__(self, logits, y):
        self.logits, self.y = logits, y

    def label_logits(self, data, labeled=False, base=False):
        return self.logits[data], (self.logits[data] * 0 if base else None), self.y[data] if labeled else None, data


def test_wrapper_divides_the_logits_and_keeps_the_answers():
    logits, y = _sample(2.0, n=2000)
    ts = TemperatureScaled(_FixedLogits(logits, y)).fit_logits(logits[:1000], y[:1000])
    held = np.arange(1000, 2000)
    scaled, _, _, _ = ts.label_logits(held)
    np.testing.assert_allclose(scaled, logits[held] / ts.temperature_)
    assert (ts.predict(held) == logits[held].argmax(1)).all()
    assert ts.val_nll_["after"] <= ts.val_nll_["before"]
    # fitted on one half, it also lowers the NLL of the other
    assert temperature_nll(logits[held], y[held], ts.temperature_) < temperature_nll(logits[held], y[held], 1.0)
    with pytest.raises(LmtuneError, match="not fitted yet"):
        TemperatureScaled(_FixedLogits(logits, y)).predict_proba(held)
    with pytest.raises(LmtuneError, match="temperature-scaled already"):
        TemperatureScaled(ts).fit(held)


def test_saved_calibrated_run_loads_with_its_temperature(tmp_path, tiny_lm, review_task, capsys, tiny_model_dir):
    train = open_data("builtin:reviews:train").subset(range(40))
    val = open_data("builtin:reviews:train").subset(range(40, 72))
    test = open_data("builtin:reviews:test").subset(range(12))
    est = lmtune.ClosedFormClassifier(tiny_lm, review_task, progress=False).fit(train)
    ts = TemperatureScaled(est).fit(val)
    ts.save(tmp_path / "cal")
    card = json.loads((tmp_path / "cal/card.json").read_text())
    assert card["method"] == "closed-form" and card["calibration"]["temperature"] == ts.temperature_
    assert card["calibration"]["val"]["n"] == len(val)
    back = lmtune.load_run(tmp_path / "cal", model=tiny_lm, progress=False)
    assert isinstance(back, TemperatureScaled) and back.temperature_ == ts.temperature_
    np.testing.assert_array_equal(back.predict_proba(test), ts.predict_proba(test))
    ev = lmtune.evaluate(back, test)
    assert ev["method"] == "closed-form (temperature-scaled)"
    logits, _, y, _ = est.label_logits(test, labeled=True)
    expected = classification_report(y, softmax(logits / ts.temperature_), review_task.labels)
    assert ev["metrics"]["nll"] == pytest.approx(expected["nll"], rel=1e-9)
    # the CLI does the same from a run folder
    est.save(tmp_path / "plain")
    write_jsonl(tmp_path / "val.jsonl", val.records)
    capsys.readouterr()
    assert main(["calibrate", str(tmp_path / "plain"), "--val", str(tmp_path / "val.jsonl"), "--model",
                 str(tiny_model_dir), "--out", str(tmp_path / "cal2"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["temperature"] == pytest.approx(ts.temperature_, rel=1e-9)


def test_reliability_png_is_written(tmp_path):
    logits, y = _sample(2.0, n=500, k=3)
    rel = reliability(y, softmax(logits), 10)
    fig = reliability_figure([("raw", rel, 0.12), ("scaled", rel, 0.03)])
    fig.savefig(tmp_path / "r.png", format="png")
    data = (tmp_path / "r.png").read_bytes()
    assert data[:8] == PNG_MAGIC
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > height  # two panels side by side
    axes = fig.get_axes()
    assert len(axes) == 4 and "ECE 0.1200" in axes[0].get_title()
    # the bars are the bins' accuracies, the count panel the bins' records
    heights = [p.get_height() for p in axes[1].patches]
    assert sum(heights) == len(y)
    # JSON lists with None for empty bins draw the same
    as_json = json.loads(json.dumps(lmtune.metrics.to_jsonable(rel)))
    reliability_overlay([("raw", as_json, None)]).savefig(tmp_path / "o.png", format="png")
    assert (tmp_path / "o.png").read_bytes()[:8] == PNG_MAGIC


# -- the comparison report ---------------------------------------------------------------------------------


def test_method_names_with_a_posterior():
    assert check_methods("closed-form+exact,zero-shot,closed-form") == ["zero-shot", "closed-form", "closed-form+exact"]
    with pytest.raises(LmtuneError, match="zero-shot has no posterior"):
        check_methods("zero-shot+exact")
    with pytest.raises(LmtuneError, match="closed-form offers the posteriors exact, not svgd"):
        check_methods("closed-form+svgd")
    with pytest.raises(LmtuneError, match="unknown method nope\\+exact; .*with a posterior: closed-form\\+exact"):
        check_methods("nope+exact")
    assert route_options({"epochs": 1}, ["closed-form+exact", "lora"], ["epochs"]) == {"lora": {"epochs": 1}}


@pytest.fixture(scope="module")
def compared(tmp_path_factory, tiny_lm):
    out = tmp_path_factory.mktemp("cmp") / "report"
    task = lmtune.ClassificationTask(TEMPLATE, {"negative": "no", "positive": "yes"})
    train = open_data("builtin:reviews:train").subset(range(48))
    val = open_data("builtin:reviews:train").subset(range(48, 80))
    test = open_data("builtin:reviews:test").subset(range(24))
    res = compare(tiny_lm, task, train, test, ["closed-form+exact", "zero-shot", "closed-form"], val=val, out=out,
                  progress=False, latency_examples=0)
    return res, out, task, val, test


def test_compare_report_has_the_calibration_section(compared):
    res, out, _, _, _ = compared
    assert [r["method"] for r in res["rows"]] == ["zero-shot", "closed-form", "closed-form+exact"]
    assert all(tuple(r) == ROW_KEYS for r in res["rows"])
    for name in REPORT_FILES:
        assert (out / name).is_file()
    for r in res["rows"]:
        png = out / "reliability" / f"{r['method']}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC
        c = res["calibration"]["methods"][r["method"]]
        assert c["ece"] == r["ece"] and sum(c["reliability"]["counts"]) == res["test"]["n"]
        assert c["ts_ece"] == r["ts_ece"] and r["temperature"] > 0
    md = (out / "report.md").read_text()
    section = md[md.index("## Calibration"):]
    for r in res["rows"]:
        assert f"| {r['method']} " in section and f"| {r['method']}, temperature-scaled " in section
        assert f"(reliability/{r['method']}.png)" in section
    header = [h.strip() for h in section.split("\n| method")[1].split("\n")[0].split("|")[1:-1]]
    assert header == ["T", "accuracy", "NLL", "ECE", "Brier", "reliability diagram"]
    csv_header = (out / "report.csv").read_text().splitlines()[0].split(",")
    assert {"temperature", "ts_nll", "ts_ece", "ts_brier"} <= set(csv_header)


def test_compare_temperature_rows_are_what_the_wrapper_gives(compared, tiny_lm):
    res, out, task, val, test = compared
    rows = {r["method"]: r for r in res["rows"]}
    for name in ("closed-form", "closed-form+exact"):
        est = lmtune.load_run(out / "runs" / name, model=tiny_lm, progress=False)
        ts = TemperatureScaled(est).fit(val)
        assert rows[name]["temperature"] == pytest.approx(ts.temperature_, rel=1e-6)
        logits, _, y, _ = ts.label_logits(test, labeled=True)
        m = classification_report(y, softmax(logits), task.labels)
        assert rows[name]["ts_nll"] == pytest.approx(m["nll"], rel=1e-6)
        assert rows[name]["ts_ece"] == pytest.approx(m["ece"], abs=1e-9)
        assert rows[name]["accuracy"] == pytest.approx(m["accuracy"])  # scaling never changes an answer
    card = json.loads((out / "runs/closed-form+exact/card.json").read_text())
    assert card["params"]["bayes"] == "exact"  # the +exact row really is the posterior


def test_compare_without_validation_has_no_temperature(tmp_path, tiny_model_dir, capsys):
    train = open_data("builtin:reviews:train").subset(range(40))
    test = open_data("builtin:reviews:test").subset(range(8))
    write_jsonl(tmp_path / "train.jsonl", train.records)
    write_jsonl(tmp_path / "test.jsonl", test.records)
    capsys.readouterr()
    rc = main(["compare", "--model", str(tiny_model_dir), "--train", str(tmp_path / "train.jsonl"), "--test",
               str(tmp_path / "test.jsonl"), "--template", TEMPLATE, "--label-words", "negative=no,positive=yes",
               "--methods", "closed-form+exact,closed-form", "--latency-examples", "0", "--out", str(tmp_path / "r")])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "r/report.json").read_text())
    assert [r["method"] for r in res["rows"]] == ["closed-form", "closed-form+exact"]
    assert all(r["temperature"] is None and r["ts_nll"] is None for r in res["rows"])
    md = (tmp_path / "r/report.md").read_text()
    assert "## Calibration" in md and "temperature-scaled |" not in md and "No validation data" in md
    assert math.isfinite(res["calibration"]["methods"]["closed-form+exact"]["ece"])

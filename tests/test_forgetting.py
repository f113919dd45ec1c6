"""The forgetting suite: reading it, scoring base vs adapted, and the compare report's forgetting column."""

import json

import pytest

import lmtune
from lmtune import cli
from lmtune.data import Dataset
from lmtune.errors import LmtuneError
from lmtune.forgetting import forgetting, headline, read_suite
from lmtune.instruct import GenerationTask

SUITE = """
tasks:
  - name: reviews
    type: classification
    data: builtin:reviews:test
    template: "Review: {text} answer yes or no"
    label_words: "negative=no,positive=yes"
    limit: 8
  - name: held
    type: lm
    data: held.jsonl
  - name: answers
    type: generation
    data: builtin:instruct:test
    metrics: [rouge, exact]
    max_new_tokens: 3
    limit: 3
"""


@pytest.fixture
def suite(tmp_path):
    (tmp_path / "held.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in
                                                 ("the review is positive", "this text is a question")))
    p = tmp_path / "suite.yaml"
    p.write_text(SUITE)
    return p


@pytest.fixture(scope="module")
def gen_run(tiny_lm):
    recs = [{"instruction": "is this review positive", "output": "yes the answer is yes"}] * 8
    return lmtune.LoraClassifier(tiny_lm, GenerationTask(), epochs=3, lr=5e-2, batch_size=4,
                                 progress=False).fit(Dataset.from_records(recs))


def test_read_suite_resolves_paths_and_checks_entries(suite, tmp_path):
    tasks = read_suite(suite)
    assert [t["name"] for t in tasks] == ["reviews", "held", "answers"]
    assert tasks[1]["data"] == str(tmp_path / "held.jsonl")
    assert [t["type"] for t in read_suite("builtin")] == ["classification", "generation", "multiple-choice", "lm"]
    bad = tmp_path / "bad.yaml"
    for text, msg in [("tasks: []", "'tasks' list"), ("tasks:\n  - name: a\n    type: poem\n    data: x", "type"),
                      ("tasks:\n  - name: a\n    type: lm\n    data: x\n    colour: red", "unknown key"),
                      ("tasks:\n  - name: a\n    type: classification\n    data: x", "template"),
                      ("tasks: [", "not valid YAML")]:
        bad.write_text(text)
        with pytest.raises(LmtuneError, match=msg):
            read_suite(bad)


def test_adapted_run_changes_scores_and_unchanged_methods_do_not(tiny_lm, gen_run, suite, review_task):
    res = forgetting(gen_run, suite)
    held = res["tasks"]["held"]
    assert res["changes_model"]
    assert held["delta"]["loss"] == pytest.approx(held["adapted"]["loss"] - held["base"]["loss"])
    assert held["delta"]["loss"] != 0 and held["worse"]["loss"] == "up"
    assert res["tasks"]["answers"]["adapted"]["n"] == 3
    # the base scores are the model's own: scoring again with nothing attached gives the same numbers
    again = forgetting(lmtune.ZeroShotClassifier(tiny_lm, review_task).fit(), suite)
    assert not again["changes_model"]
    assert again["tasks"]["held"]["base"]["loss"] == pytest.approx(held["base"]["loss"], rel=1e-6)
    assert all(v == 0 for t in again["tasks"].values() for v in t["delta"].values())
    assert headline(res)["held"]["metric"] == "loss"


def test_cli_forgetting(tiny_model_dir, gen_run, suite, tmp_path, capsys):
    run = gen_run.save(tmp_path / "run")
    rc = cli.main(["forgetting", str(run), "--suite", str(suite), "--model", str(tiny_model_dir), "--json",
                   "--out", str(tmp_path / "f.json")])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert json.loads((tmp_path / "f.json").read_text()) == res
    assert set(res["tasks"]) == {"reviews", "held", "answers"}
    rc = cli.main(["forgetting", str(run), "--suite", str(tmp_path / "missing.yaml")])
    assert rc == 2 and "not found" in capsys.readouterr().err


def test_compare_gains_a_forgetting_column(tiny_lm, review_task, suite, tmp_path):
    from lmtune.compare import compare

    train = lmtune.data.open_data("builtin:reviews:train").subset(range(16))
    test = lmtune.data.open_data("builtin:reviews:test").subset(range(8))
    res = compare(tiny_lm, review_task, train, test, ["zero-shot", "lora"], out=tmp_path / "cmp", progress=False,
                  latency_examples=0, options={"lora": {"epochs": 1, "lr": 5e-2}}, forgetting_suite=str(suite))
    rows = {r["method"]: r for r in res["rows"]}
    assert rows["zero-shot"]["forget_lm_delta"] == 0
    assert rows["lora"]["forget_lm_delta"] == pytest.approx(res["forgetting"]["lora"]["tasks"]["held"]["delta"]["loss"])
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "## Forgetting" in report and "held-text loss change" in report

"""The ``lmtune`` command, run in-process on the tiny model: the main paths and every bad-input case.

Bad input must end with exit status 2 and one ``lmtune: error:`` line naming the file and line, never a
traceback; ``--json`` must leave exactly one JSON object on stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmtune.cli import main
from lmtune.data import load_builtin, read_records

TEMPLATE = "Review: {text}\nIs this review positive? Answer yes or no."
LABEL_WORDS = "negative=no,positive=yes"
REPO = Path(__file__).resolve().parents[1]


def run_cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()  # drop anything printed before
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def write_jsonl(path: Path, records, blank_after: int | None = None) -> Path:
    lines = [json.dumps(r) for r in records]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def task_args(label_words=LABEL_WORDS):
    return ["--template", TEMPLATE, "--label-words", label_words]


@pytest.fixture(scope="module")
def records():
    return load_builtin("reviews").records[:40]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory, records):
    # A blank line after record 5, so record i is not simply on line i + 1.
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", records, blank_after=5)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir, data_file):
    out = tmp_path_factory.mktemp("runs") / "cf"
    rc = main(["fit", "--method", "closed-form", "--model", str(tiny_model_dir), "--train", str(data_file),
               "--out", str(out), *task_args(), "--json"])
    assert rc == 0
    return out


# -- the main paths -----------------------------------------------------------------------------------


def test_fit_closed_form_writes_a_run(capsys, tmp_path, tiny_model_dir, data_file):
    out = tmp_path / "run"
    rc, stdout, err = run_cli(capsys, "fit", "--method", "closed-form", "--model", tiny_model_dir, "--train",
                              data_file, "--out", out, *task_args())
    assert rc == 0, err
    assert f"saved closed-form run to {out}" in stdout
    assert "train accuracy" in stdout and "lambda" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["card.json", "head.safetensors"]
    card = json.loads((out / "card.json").read_text())
    assert card["method"] == "closed-form" and card["model"] == str(tiny_model_dir)
    assert card["train"] == {"path": str(data_file), "n": 40, "sha256": read_records(data_file).content_hash()}
    assert card["task"]["template"] == TEMPLATE and card["labels"] == ["negative", "positive"]


def test_fit_json_prints_the_card(capsys, tmp_path, tiny_model_dir, data_file):
    out = tmp_path / "run"
    rc, stdout, _ = run_cli(capsys, "fit", "--method", "closed-form", "--model", tiny_model_dir, "--train",
                            data_file, "--out", out, *task_args(), "--lam", "2.5", "--json")
    assert rc == 0
    card = json.loads(stdout)
    assert card == json.loads((out / "card.json").read_text())
    assert card["params"]["lam"] == 2.5 and card["fitted"]["lam"] == 2.5


def test_eval_json_is_one_object(capsys, tiny_model_dir, run_dir, data_file):
    rc, stdout, err = run_cli(capsys, "eval", run_dir, "--data", data_file, "--model", tiny_model_dir, "--json")
    assert rc == 0, err
    ev = json.loads(stdout)  # the whole of stdout is one JSON document
    assert list(ev) == ["method", "model", "data", "metrics", "zero_shot", "flips"]
    assert ev["method"] == "closed-form" and ev["model"] == str(tiny_model_dir)
    assert ev["data"] == {"path": str(data_file), "n": 40, "sha256": read_records(data_file).content_hash()}
    for key in ("accuracy", "macro_f1", "nll", "brier", "ece", "per_class", "confusion_matrix"):
        assert key in ev["metrics"] and key in ev["zero_shot"]
    assert 0.0 <= ev["metrics"]["accuracy"] <= 1.0
    assert ev["flips"]["n"] == 40
    assert sum(ev["flips"][k] for k in ("wrong_to_right", "right_to_wrong", "wrong_to_wrong")) \
        == ev["flips"]["flipped"]


def test_eval_without_model_uses_the_runs_model_and_prints_text(capsys, run_dir, data_file, tiny_model_dir):
    rc, stdout, err = run_cli(capsys, "eval", run_dir, "--data", data_file)
    assert rc == 0, err
    assert stdout.startswith(f"closed-form on {data_file} (n=40): accuracy ")
    assert "confusion matrix" in stdout and "flips against zero-shot" in stdout


def test_predict_one_line_per_record_in_input_order(capsys, tmp_path, run_dir, data_file, records):
    rc, stdout, err = run_cli(capsys, "predict", run_dir, "--data", data_file)
    assert rc == 0, err
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert len(rows) == 40
    assert [r["line"] for r in rows] == read_records(data_file).lines
    assert [r["line"] for r in rows][4:7] == [5, 7, 8]  # the blank line is counted
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    for r in rows:
        assert list(r["probabilities"]) == ["negative", "positive"]
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-9)
        assert r["label"] == max(r["probabilities"], key=r["probabilities"].get)

    out = tmp_path / "pred" / "p.jsonl"
    rc, stdout2, _ = run_cli(capsys, "predict", run_dir, "--data", data_file, "--out", out)
    assert rc == 0 and stdout2 == ""
    assert out.read_text() == stdout
    assert [p.name for p in out.parent.iterdir()] == ["p.jsonl"]


def test_predict_needs_no_labels(capsys, tmp_path, run_dir, records):
    unlabeled = write_jsonl(tmp_path / "u.jsonl", [{"text": r["text"]} for r in records[:3]])
    rc, stdout, err = run_cli(capsys, "predict", run_dir, "--data", unlabeled)
    assert rc == 0, err
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert [r["line"] for r in rows] == [1, 2, 3] and all("id" not in r for r in rows)


def test_predict_probabilities_match_the_library(capsys, run_dir, data_file):
    import lmtune

    rc, stdout, _ = run_cli(capsys, "predict", run_dir, "--data", data_file)
    p_cli = np.array([[r["probabilities"][k] for k in ("negative", "positive")] for r in map(json.loads,
                                                                                             stdout.splitlines())])
    np.testing.assert_allclose(p_cli, lmtune.load_run(run_dir).predict_proba(str(data_file)), rtol=1e-12)


def test_eval_zero_shot(capsys, tiny_model_dir, data_file):
    rc, stdout, err = run_cli(capsys, "eval", "--zero-shot", "--model", tiny_model_dir, *task_args(), "--data",
                              data_file, "--json")
    assert rc == 0, err
    ev = json.loads(stdout)
    assert ev["method"] == "zero-shot" and list(ev) == ["method", "model", "data", "metrics"]
    assert ev["metrics"]["n"] == 40


def test_json_stdout_stays_clean_when_prompts_are_truncated(capsys, tiny_lm, tiny_model_dir, data_file):
    from lmtune.tasks import ClassificationTask

    with pytest.warns(UserWarning):
        n_long = ClassificationTask(TEMPLATE, LABEL_WORDS, max_length=40).encode(
            tiny_lm.tokenizer, read_records(data_file), labeled=False).n_truncated
    assert 0 < n_long < 40
    rc, stdout, err = run_cli(capsys, "eval", "--zero-shot", "--model", tiny_model_dir, *task_args(), "--data",
                              data_file, "--max-length", "40", "--json")
    assert rc == 0, err
    assert json.loads(stdout)["metrics"]["n"] == 40  # warnings did not leak into stdout
    assert err.startswith("lmtune: warning: ")
    assert f"{n_long} of 40 prompts were longer than max_length=40" in err


def test_fit_zero_shot_and_eval_its_run(capsys, tmp_path, tiny_model_dir, data_file):
    out = tmp_path / "zs"
    rc, stdout, err = run_cli(capsys, "fit", "--method", "zero-shot", "--model", tiny_model_dir, "--train",
                              data_file, "--out", out, *task_args())
    assert rc == 0, err
    assert stdout.strip() == f"saved zero-shot run to {out}"
    assert sorted(p.name for p in out.iterdir()) == ["card.json"]
    rc, stdout, _ = run_cli(capsys, "eval", out, "--data", data_file, "--json")
    assert rc == 0 and json.loads(stdout)["method"] == "zero-shot"


def test_methods(capsys):
    rc, stdout, _ = run_cli(capsys, "methods")
    assert rc == 0
    names = [line.split()[0] for line in stdout.splitlines()]
    from lmtune.methods import METHODS

    assert names == list(METHODS)
    assert names[:2] == ["zero-shot", "closed-form"] and {"lora", "prompt-tuning", "adapter", "full"} <= set(names)


def test_help_texts_come_from_the_docstrings(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "Ridge penalty" in out and "Label smoothing" in out and "Prompts per forward pass" in out
    assert "``" not in out


# -- bad input ----------------------------------------------------------------------------------------


def assert_clean_error(rc, out, err, *fragments):
    assert rc == 2
    assert err.startswith("lmtune: error: ")
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert out == ""
    for f in fragments:
        assert f in err, (f, err)


@pytest.fixture
def bad_files(tmp_path, records):
    r = records
    files = {
        "malformed": tmp_path / "malformed.jsonl",
        "missing_field": write_jsonl(tmp_path / "missing_field.jsonl", [r[0], {"label": "positive"}, r[2]]),
        "unknown_label": write_jsonl(tmp_path / "unknown_label.jsonl", [r[0], r[1], dict(r[2], label="neutral")]),
        "empty": tmp_path / "empty.jsonl",
        "csv_columns": tmp_path / "cols.csv",
        "latin1": tmp_path / "latin1.csv",
    }
    files["malformed"].write_text(json.dumps(r[0]) + "\n\n" + '{"text": "oops", "label": }\n')
    files["empty"].write_text("")
    files["csv_columns"].write_text('text,label\n"a good,\nlong one",positive\nbad,negative,extra\n')
    files["latin1"].write_bytes(b"text,label\ncaf\xe9,positive\n")
    return files


BAD_DATA = [
    ("malformed", ["malformed.jsonl:3: not valid JSON"]),
    ("missing_field", ["missing_field.jsonl:2, field 'text': missing or empty"]),
    ("unknown_label", ["unknown_label.jsonl:3, field 'label': unknown label 'neutral'", "['negative', 'positive']"]),
    ("empty", ["empty.jsonl: the file has no records"]),
    ("csv_columns", ["cols.csv:4: expected 2 columns (text, label), found 3"]),
    ("latin1", ["latin1.csv:2: not UTF-8"]),
]


@pytest.mark.parametrize("command, kind, fragments",
                         [("eval", k, f) for k, f in BAD_DATA]
                         + [("predict", k, f) for k, f in BAD_DATA if k != "unknown_label"])  # predict reads no labels
def test_bad_data_through_eval_and_predict(capsys, run_dir, bad_files, command, kind, fragments):
    rc, out, err = run_cli(capsys, command, run_dir, "--data", bad_files[kind])
    assert_clean_error(rc, out, err, *fragments)


@pytest.mark.parametrize("kind", ["malformed", "missing_field", "unknown_label", "empty"])
def test_bad_data_through_fit(capsys, tmp_path, tiny_model_dir, bad_files, kind):
    out = tmp_path / "run"
    rc, stdout, err = run_cli(capsys, "fit", "--method", "closed-form", "--model", tiny_model_dir, "--train",
                              bad_files[kind], "--out", out, *task_args())
    assert_clean_error(rc, stdout, err, bad_files[kind].name)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_fit_zero_shot_reads_its_training_file(capsys, tmp_path, tiny_model_dir, bad_files):
    rc, out, err = run_cli(capsys, "fit", "--method", "zero-shot", "--model", tiny_model_dir, "--train",
                           bad_files["malformed"], "--out", tmp_path / "zs", *task_args())
    assert_clean_error(rc, out, err, "malformed.jsonl:3: not valid JSON")
    assert not (tmp_path / "zs").exists()


def test_label_words_sharing_a_token(capsys, tiny_model_dir, data_file, tmp_path):
    rc, out, err = run_cli(capsys, "eval", "--zero-shot", "--model", tiny_model_dir, *task_args(
        "negative=yes no,positive=yes please"), "--data", data_file)
    assert_clean_error(rc, out, err, "'yes please' (label 'positive')", "'yes no' (label 'negative')",
                       "start with the same token")
    rc, out, err = run_cli(capsys, "fit", "--method", "closed-form", "--model", tiny_model_dir, "--train", data_file,
                           "--out", tmp_path / "run", *task_args("negative=yes no,positive=yes please"))
    assert_clean_error(rc, out, err, "start with the same token")


def test_missing_run_folder(capsys, tmp_path, data_file):
    rc, out, err = run_cli(capsys, "eval", tmp_path / "no-such-run", "--data", data_file)
    assert_clean_error(rc, out, err, f"{tmp_path / 'no-such-run'} is not an lmtune run folder")


def test_fit_refuses_to_replace_a_folder_that_is_not_a_run(capsys, tmp_path, tiny_model_dir, data_file):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    rc, out, err = run_cli(capsys, "fit", "--method", "closed-form", "--model", tiny_model_dir, "--train",
                           data_file, "--out", target, *task_args())
    assert_clean_error(rc, out, err, f"{target} exists and is not an lmtune run folder")
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    assert (target / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]


def test_usage_errors(capsys, run_dir, data_file, tiny_model_dir, tmp_path):
    rc, out, err = run_cli(capsys, "eval", run_dir, "--zero-shot", "--data", data_file)
    assert_clean_error(rc, out, err, "give either a run folder or --zero-shot")
    rc, out, err = run_cli(capsys, "eval", "--data", data_file)
    assert_clean_error(rc, out, err, "give either a run folder or --zero-shot")
    rc, out, err = run_cli(capsys, "eval", "--zero-shot", "--model", tiny_model_dir, "--data", data_file)
    assert_clean_error(rc, out, err, "--template and --label-words are required")
    rc, out, err = run_cli(capsys, "eval", run_dir, *task_args(), "--data", data_file)
    assert_clean_error(rc, out, err, "a run folder keeps the task it was fitted with")
    rc, out, err = run_cli(capsys, "predict", run_dir, "--data", data_file, "--out", tmp_path)
    assert_clean_error(rc, out, err, f"{tmp_path} is a folder")
    (tmp_path / "a-file").write_text("")
    rc, out, err = run_cli(capsys, "predict", run_dir, "--data", data_file, "--out", tmp_path / "a-file" / "p.jsonl")
    assert_clean_error(rc, out, err, "File exists", "a-file")  # an OSError is the user's to fix, too
    rc, out, err = run_cli(capsys, "eval", "--zero-shot", "--model", tmp_path, *task_args(), "--data", data_file)
    assert_clean_error(rc, out, err, "has no config.json")
    rc, out, err = run_cli(capsys, "eval", "--zero-shot", "--model", tiny_model_dir, "--template", "{text!r}",
                           "--label-words", LABEL_WORDS, "--data", data_file)
    assert_clean_error(rc, out, err, "bad template placeholder {text}")
    rc, out, err = run_cli(capsys, "eval", "--zero-shot", "--model", tiny_model_dir, "--template", TEMPLATE,
                           "--label-words", "negative:no,positive:yes", "--data", data_file)
    assert_clean_error(rc, out, err, "--label-words: expected LABEL=WORD pairs")
    rc, out, err = run_cli(capsys, "eval", run_dir, "--data", "builtin:nope")
    assert_clean_error(rc, out, err, "unknown built-in dataset 'nope'")


@pytest.mark.parametrize("args, message", [
    (["eval", "r", "--data", "d.jsonl", "--batch-size", "0"], "argument --batch-size: expected a number >= 1"),
    (["eval", "r", "--data", "d.jsonl", "--bins", "zero"], "argument --bins: expected an integer, got 'zero'"),
    (["fit", "--method", "closed-form", "--train", "d", "--out", "o", "--template", "{t}", "--label-words", "a=b",
      "--lam", "-1"], "argument --lam: expected a number >= 0"),
    (["fit", "--method", "closed-form", "--train", "d", "--out", "o", "--template", "{t}", "--label-words", "a=b",
      "--lam", "nan"], "argument --lam: expected a number >= 0"),
    (["fit", "--method", "nope", "--train", "d", "--out", "o", "--template", "{t}", "--label-words", "a=b"],
     "argument --method: invalid choice"),
])
def test_bad_option_values_are_usage_errors(capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# -- atomicity ----------------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_failed_fit_leaves_the_existing_run_untouched(capsys, tmp_path, tiny_model_dir, data_file, bad_files):
    out = tmp_path / "run"
    rc, _, _ = run_cli(capsys, "fit", "--method", "closed-form", "--model", tiny_model_dir, "--train", data_file,
                       "--out", out, *task_args())
    assert rc == 0
    before = snapshot(out)
    for kind in ("malformed", "unknown_label"):
        rc, stdout, err = run_cli(capsys, "fit", "--method", "closed-form", "--model", tiny_model_dir, "--train",
                                  bad_files[kind], "--out", out, *task_args(), "--lam", "1")
        assert_clean_error(rc, stdout, err, bad_files[kind].name)
        assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith((".jsonl", ".csv"))) == ["run"]

    # A successful refit replaces the run whole, and leaves nothing beside it either.
    rc, _, _ = run_cli(capsys, "fit", "--method", "closed-form", "--model", tiny_model_dir, "--train", data_file,
                       "--out", out, *task_args(), "--lam", "1")
    assert rc == 0
    assert json.loads((out / "card.json").read_text())["fitted"]["lam"] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith((".jsonl", ".csv"))) == ["run"]


def test_failed_predict_leaves_the_existing_output_untouched(capsys, tmp_path, run_dir, bad_files):
    out = tmp_path / "pred.jsonl"
    out.write_text("earlier predictions\n")
    rc, stdout, err = run_cli(capsys, "predict", run_dir, "--data", bad_files["missing_field"], "--out", out)
    assert_clean_error(rc, stdout, err, "missing_field.jsonl:2")
    assert out.read_text() == "earlier predictions\n"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


# -- the real entry point -----------------------------------------------------------------------------


def test_console_script_points_at_main():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "lmtune"]
    assert ep.value == "lmtune.cli:main"


def test_entry_point_exits_nonzero_without_traceback(tmp_path, run_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": "positive"}\n{"text": broken}\n')
    proc = subprocess.run([sys.executable, "-m", "lmtune.cli", "predict", str(run_dir), "--data", str(bad)],
                          capture_output=True, text=True, cwd=REPO, env=dict(os.environ), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("lmtune: error: ") and f"{bad}:2: not valid JSON" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_closed_stdout_pipe_ends_quietly():
    # `lmtune predict ... | head`: the reader leaves early; no error message, no traceback, exit status 1.
    # A child process writes to a pipe whose read end is closed, so the write really fails (EPIPE), and
    # the interpreter's last flush runs after main returns, as in a shell pipeline.
    import os
    import subprocess
    import sys

    child = (
        "import sys\n"
        "import lmtune.cli\n"
        "def chatty(args):\n"
        "    for _ in range(1000):\n"
        "        print('x' * 100)\n"
        "    sys.stdout.flush()\n"
        "    return 0\n"
        "lmtune.cli.COMMANDS['methods'] = chatty\n"
        "sys.exit(lmtune.cli.main(['methods']))\n"
    )
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-c", child], stdout=write_end, stderr=subprocess.PIPE, timeout=120)
    finally:
        os.close(write_end)
    assert proc.returncode == 1, proc.stderr.decode()
    assert proc.stderr == b""


def test_text_report_survives_undefined_metrics():
    from lmtune.report import metrics_text

    m = {"accuracy": 0.5, "macro_f1": None, "nll": 0.7, "brier": None, "ece": None, "ece_bins": 15,
         "per_class": {"a": {"precision": None, "recall": 0.0, "f1": None, "support": 0}},
         "confusion_matrix": {"labels": ["a"], "matrix": [[0]]}}
    text = metrics_text({"method": "m", "data": {"path": "p", "n": 2}, "metrics": m})
    assert text.startswith("m on p (n=2): accuracy 0.5000, macro-F1 -, NLL 0.7000, Brier -, ECE(15 bins) -")

"""Run folders: atomic replacement, permissions, early refusal of a bad --out, damaged runs."""

import json
import os
import stat

import numpy as np
import pytest

import lmtune
from lmtune import cli
from lmtune.errors import LmtuneError
from lmtune.runs import check_run_destination, write_run


def test_write_run_replaces_a_run_and_uses_normal_permissions(tmp_path):
    dest = tmp_path / "run"
    write_run(dest, {"method": "x", "v": 1}, lambda f: (f / "a.bin").write_bytes(b"1"))
    write_run(dest, {"method": "x", "v": 2}, lambda f: (f / "b.bin").write_bytes(b"2"))
    assert sorted(p.name for p in dest.iterdir()) == ["b.bin", "card.json"]
    assert json.loads((dest / "card.json").read_text())["v"] == 2
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((dest / "b.bin").stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no temporary or old folder left


def test_a_failing_writer_leaves_the_old_run(tmp_path):
    dest = tmp_path / "run"
    write_run(dest, {"method": "x", "v": 1}, lambda f: None)

    def boom(folder):
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_run(dest, {"method": "x", "v": 2}, boom)
    assert json.loads((dest / "card.json").read_text())["v"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_destination_that_is_not_a_run_is_refused(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(LmtuneError, match="not an lmtune run folder"):
        check_run_destination(tmp_path / "notes")
    check_run_destination(tmp_path / "empty")  # absent is fine


def test_fit_refuses_a_bad_out_before_loading_the_model(tmp_path, capsys, monkeypatch):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    monkeypatch.setattr(lmtune.models, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    code = cli.main(["fit", "--method", "closed-form", "--model", "no-such-model", "--train", "builtin:reviews:train",
                     "--template", "{text}", "--label-words", "negative=no,positive=yes",
                     "--out", str(tmp_path / "notes")])
    assert code == 2 and "not an lmtune run folder" in capsys.readouterr().err


def test_cli_reads_backslash_n_in_templates(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "zs"
    assert cli.main(["fit", "--method", "zero-shot", "--model", str(tiny_model_dir), "--train",
                     "builtin:reviews:test", "--template", "Review: {text}\\nPositive?",
                     "--label-words", "negative=no,positive=yes", "--out", str(out), "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["task"]["template"] == "Review: {text}\nPositive?"
    assert card["model"] == str(tiny_model_dir.resolve())


def test_zero_shot_fit_validates_its_data(tiny_lm, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": "positive"}\n{"text": "meh", "label": "neutral"}\n')
    task = lmtune.ClassificationTask("{text}", "negative=no,positive=yes")
    with pytest.raises(lmtune.DataError, match=r"bad.jsonl:2.*'label'.*unknown label 'neutral'"):
        lmtune.ZeroShotClassifier(tiny_lm, task).fit(bad)


def test_damaged_run_is_a_clear_error(tiny_lm, review_task, tmp_path):
    cf = lmtune.ClosedFormClassifier(tiny_lm, review_task, lam=1.0, progress=False)
    cf.fit(lmtune.load_builtin("reviews", "train").subset(range(40)))
    run = cf.save(tmp_path / "run")
    (run / "head.safetensors").unlink()
    with pytest.raises(LmtuneError, match="damaged run folder"):
        lmtune.load_run(run, model=tiny_lm)
    assert np.isfinite(cf.weight_).all()

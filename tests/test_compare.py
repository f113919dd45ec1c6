"""``lmtune.compare`` and ``lmtune compare`` on the tiny model: every report agrees with the others and with
independent counts of what each run holds (parameters, files, predictions)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from lmtune.cli import TRAINING_OPTIONS, main
from lmtune.compare import REPORT_FILES, ROW_KEYS, check_methods, compare, route_options
from lmtune.data import open_data, write_jsonl
from lmtune.errors import LmtuneError
from lmtune.tasks import ClassificationTask

TEMPLATE = "Review: {text}\nIs this review positive? Answer yes or no."
LABEL_WORDS = {"negative": "no", "positive": "yes"}
N_TRAIN, N_TEST, N_LATENCY = 48, 24, 8


@pytest.fixture(scope="module")
def data():
    return (open_data("builtin:reviews:train").subset(range(N_TRAIN)),
            open_data("builtin:reviews:test").subset(range(N_TEST)))


@pytest.fixture(scope="module")
def result(tmp_path_factory, tiny_lm, data):
    out = tmp_path_factory.mktemp("compare") / "report"
    train, test = data
    # Asked for out of order: the rows must still come in registry order.
    res = compare(tiny_lm, ClassificationTask(TEMPLATE, LABEL_WORDS), train, test,
                  ["last-layers", "lora", "zero-shot", "closed-form"],
                  options={"lora": {"epochs": 1}, "last-layers": {"epochs": 1}}, out=out, progress=False,
                  latency_examples=N_LATENCY, batch_size=16)
    return res, out


def rows_by_method(res) -> dict[str, dict]:
    return {r["method"]: r for r in res["rows"]}


def test_rows_have_a_fixed_shape_and_order(result, tiny_lm):
    res, _ = result
    assert [r["method"] for r in res["rows"]] == ["zero-shot", "closed-form", "lora", "last-layers"]
    assert all(tuple(r) == ROW_KEYS for r in res["rows"])
    assert res["train"]["n"] == N_TRAIN and res["test"]["n"] == N_TEST and res["val"] is None
    assert res["latency_examples"] == N_LATENCY
    env = res["environment"]
    assert env["torch"] and env["threads"] >= 1 and env["device"].split(":")[0] == tiny_lm.device.type
    json.dumps(res, allow_nan=False)  # JSON-able as promised


def test_every_report_file_is_written_and_they_agree(result):
    res, out = result
    for name in REPORT_FILES:
        assert (out / name).stat().st_size > 0, name
    for name in ("quality_vs_params.png", "quality_vs_time.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left

    assert json.loads((out / "report.json").read_text()) == res

    with open(out / "report.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(res["rows"])
    for c, r in zip(csv_rows, res["rows"]):
        assert list(c) == list(ROW_KEYS)
        for k in ROW_KEYS:
            v = r[k]
            if v is None:
                assert c[k] == "", k
            elif isinstance(v, (int, float)):
                assert float(c[k]) == v, k  # every digit kept
            else:
                assert c[k] == v, k

    md = (out / "report.md").read_text()
    main_part = md[:md.index("## Calibration")]  # the calibration section has its own table (test_calibration.py)
    table = [line for line in main_part.splitlines() if line.startswith("| ")]
    header = [h.strip() for h in table[0].strip("|").split("|")]
    cells = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in table[1:]]
    assert [c["method"] for c in cells] == [r["method"] for r in res["rows"]]
    for c, r in zip(cells, res["rows"]):
        assert c["accuracy"] == f"{r['accuracy']:.4f}"
        assert c["NLL"] == f"{r['nll']:.4f}"
        assert c["trainable params"] == f"{r['trainable_params']:,}"
    for axis in ("Quality", "Parameter efficiency", "Memory", "Training speed", "Inference cost"):
        assert f"**{axis}**" in md


def test_trainable_parameters_match_independent_counts(result, tiny_lm):
    res, out = result
    rows = rows_by_method(res)
    base = sum(p.numel() for p in tiny_lm.model.parameters())
    d, K = tiny_lm.hidden_size, len(LABEL_WORDS)
    lora = load_file(str(out / "runs/lora/adapter_model.safetensors"))
    selected = load_file(str(out / "runs/last-layers/trained.safetensors"))
    expected = {"zero-shot": 0, "closed-form": d * K + K,
                "lora": sum(t.size for n, t in lora.items() if "lora_" in n),
                "last-layers": sum(t.size for t in selected.values())}
    assert expected["lora"] > 0 and expected["last-layers"] > expected["lora"]
    for name, n in expected.items():
        assert rows[name]["trainable_params"] == n, name
        assert rows[name]["base_params"] == base
        assert rows[name]["trainable_share"] == pytest.approx(n / base)


def test_adapter_sizes_are_the_run_files_except_the_card(result):
    res, out = result
    for r in res["rows"]:
        folder = out / r["run"]
        assert folder == out / "runs" / r["method"] and (folder / "card.json").is_file()
        files = [f for f in folder.rglob("*") if f.is_file() and f.name != "card.json"]
        assert r["adapter_bytes"] == sum(f.stat().st_size for f in files)
        assert (r["adapter_bytes"] > 0) == (r["method"] != "zero-shot")


def test_quality_is_what_evaluate_reports_for_the_saved_run(result, tiny_lm, data):
    import lmtune

    res, out = result
    for r in res["rows"]:
        ev = lmtune.evaluate(lmtune.load_run(out / r["run"], model=tiny_lm, progress=False), data[1])
        for k in ("accuracy", "macro_f1", "nll", "ece", "brier"):
            assert r[k] == pytest.approx(ev["metrics"][k], abs=1e-6), (r["method"], k)
        assert (r["flipped"] is None) == (r["method"] == "zero-shot")


def test_cost_columns(result, tiny_lm):
    res, _ = result
    rows = rows_by_method(res)
    for r in res["rows"]:
        assert r["train_seconds"] > 0 and r["latency_ms"] > 0
        assert r["peak_rss_bytes"] >= r["start_rss_bytes"] > 0
        assert r["fit_memory_bytes"] == r["peak_rss_bytes"] - r["start_rss_bytes"]
        assert r["memory_method"] in ("clear_refs", "sampling")
        # the GPU peak is measured where the model lives on a GPU, and only there
        assert (r["cuda_peak_bytes"] is None) == (tiny_lm.device.type != "cuda")
        # only a LoRA-family adapter can be folded into the weights
        assert (r["merged_latency_ms"] is not None) == (r["method"] == "lora")
    assert rows["lora"]["merged_latency_ms"] > 0
    assert rows["lora"]["merged_max_prob_diff"] < 1e-5  # merging keeps the predictions
    assert rows["lora"]["train_steps"] == math.ceil(N_TRAIN / 16)  # one epoch, batches of 16
    assert rows["closed-form"]["train_steps"] is None


def test_method_names_and_options_are_checked():
    assert check_methods("full, zero-shot") == ["zero-shot", "full"]
    with pytest.raises(LmtuneError, match="unknown method lorra; known methods: zero-shot, closed-form, lora"):
        check_methods(["zero-shot", "lorra"])
    with pytest.raises(LmtuneError, match="more than once"):
        check_methods("lora,lora")
    with pytest.raises(LmtuneError, match="not among the compared"):
        check_methods(["zero-shot"], options={"lora": {"rank": 2}})


def test_options_reach_only_the_methods_that_take_them():
    got = route_options({"epochs": 1, "rank": 4, "checkpoint_dir": "ck"},
                        ["zero-shot", "closed-form", "lora", "last-layers"], TRAINING_OPTIONS)
    assert got == {"lora": {"epochs": 1, "rank": 4, "checkpoint_dir": str(Path("ck/lora"))},
                   "last-layers": {"epochs": 1, "checkpoint_dir": str(Path("ck/last-layers"))}}
    with pytest.raises(LmtuneError, match="rank applies to none of the compared methods"):
        route_options({"epochs": 1, "rank": 4}, ["zero-shot", "last-layers"], TRAINING_OPTIONS)


def test_cli_compare(tmp_path, tiny_model_dir, data, capsys):
    train, test = data
    write_jsonl(tmp_path / "train.jsonl", train.records)
    write_jsonl(tmp_path / "test.jsonl", test.records[:8])
    common = ["compare", "--model", str(tiny_model_dir), "--train", str(tmp_path / "train.jsonl"),
              "--test", str(tmp_path / "test.jsonl"), "--template", TEMPLATE,
              "--label-words", "negative=no,positive=yes"]
    capsys.readouterr()
    rc = main([*common, "--methods", "lora,zero-shot", "--epochs", "1", "--rank", "2", "--batch-size", "24",
               "--latency-examples", "2", "--out", str(tmp_path / "r1")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.startswith("| method ") and "report.md" in out
    assert [line.split("|")[1].strip() for line in out.splitlines()[2:4]] == ["zero-shot", "lora"]
    res = json.loads((tmp_path / "r1/report.json").read_text())
    assert [r["method"] for r in res["rows"]] == ["zero-shot", "lora"]
    card = json.loads((tmp_path / "r1/runs/lora/card.json").read_text())
    assert card["hyperparameters"]["rank"] == 2  # --rank reached lora
    assert card["training"]["config"]["epochs"] == 1 and card["training"]["train"]["steps"] == 2  # 48 / 24

    rc = main([*common, "--methods", "zero-shot", "--latency-examples", "0", "--out", str(tmp_path / "r2"),
               "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    res = json.loads(out)  # stdout is exactly one JSON object
    assert res["rows"][0]["method"] == "zero-shot" and res["rows"][0]["latency_ms"] is None
    assert res["latency_examples"] == 0


@pytest.mark.parametrize("extra, message", [
    (["--methods", "zero-shot,lorra"], "unknown method lorra; known methods: zero-shot, closed-form"),
    (["--methods", "zero-shot", "--rank", "4"], "rank applies to none of the compared methods"),
])
def test_cli_compare_bad_input(tmp_path, tiny_model_dir, capsys, extra, message):
    capsys.readouterr()
    rc = main(["compare", "--model", str(tiny_model_dir), "--train", "builtin:reviews:train",
               "--test", "builtin:reviews:test", "--template", TEMPLATE, "--label-words", "negative=no,positive=yes",
               "--out", str(tmp_path / "r"), *extra])
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.startswith("lmtune: error: ") and message in err
    assert not (tmp_path / "r").exists()  # nothing written before the check

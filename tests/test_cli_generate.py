"""The generation commands on the tiny model: generate (stdout, file, resume) and eval of a generation run."""

import json

import pytest

import lmtune
from lmtune import cli
from lmtune.data import Dataset
from lmtune.generation import partial_path
from lmtune.instruct import GenerationTask

RECORDS = [{"id": f"r{i}", "instruction": "is this review positive", "input": f"the text {w}",
            "output": "yes the answer is yes"} for i, w in enumerate(["great", "bad", "fine", "poor", "good"])]


@pytest.fixture(scope="module")
def run(tiny_lm, tmp_path_factory):
    # full fine-tuning of the 2-layer model learns the answer in seconds (LoRA on it needs many more steps)
    est = lmtune.FullClassifier(tiny_lm, GenerationTask(), epochs=15, lr=1e-2, batch_size=5,
                                progress=False).fit(Dataset.from_records(RECORDS))
    return est.save(tmp_path_factory.mktemp("gen") / "run")


@pytest.fixture
def data(tmp_path):
    p = tmp_path / "test.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return p


def test_generate_streams_rows_and_writes_a_file(run, data, tmp_path, capsys, tiny_model_dir):
    args = ["generate", str(run), "--data", str(data), "--model", str(tiny_model_dir), "--max-new-tokens", "4"]
    assert cli.main(args) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert sorted(r["id"] for r in rows) == [f"r{i}" for i in range(5)]
    assert all(r["new_tokens"] <= 4 and r["finish_reason"] in ("eos", "length") for r in rows)
    out = tmp_path / "answers.jsonl"
    assert cli.main(args + ["--out", str(out), "--json"]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["line"] for r in lines] == [1, 2, 3, 4, 5]  # input order in the file
    by_id = {r["id"]: r["text"] for r in rows}
    assert all(by_id[r["id"]] == r["text"] for r in lines)  # greedy: the same answers either way
    assert not partial_path(out).exists()


def test_a_partial_file_is_kept_unless_resumed(run, data, tmp_path, capsys, tiny_model_dir):
    out = tmp_path / "answers.jsonl"
    partial_path(out).write_text("{}\n")
    args = ["generate", str(run), "--data", str(data), "--model", str(tiny_model_dir), "--max-new-tokens", "2",
            "--out", str(out)]
    assert cli.main(args) == 2 and "--resume" in capsys.readouterr().err
    assert partial_path(out).read_text() == "{}\n"
    assert cli.main(args[:-2] + ["--resume"]) == 2  # --resume without --out


def test_eval_of_a_generation_run_scores_it_beside_the_base_model(run, data, capsys, tiny_model_dir):
    assert cli.main(["eval", str(run), "--data", str(data), "--model", str(tiny_model_dir), "--max-new-tokens",
                     "6", "--metrics", "rouge,exact", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert set(ev["metrics"]) >= {"rouge", "exact"} and "bleu" not in ev["metrics"]
    assert set(ev["base"]) >= {"rouge", "exact"}
    assert ev["metrics"]["rouge"]["rougeL"]["f1"] > ev["base"]["rouge"]["rougeL"]["f1"]
    assert ev["data"]["n"] == 5 and len(ev["examples"]) == 5
    assert cli.main(["eval", str(run), "--data", str(data), "--model", str(tiny_model_dir), "--max-new-tokens",
                     "2", "--metrics", "rouge,meteor"]) == 2
    assert "meteor" in capsys.readouterr().err

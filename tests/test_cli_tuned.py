"""The command line with the gradient methods: fit, eval, predict, merge, and option checking."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmtune.cli import main
from lmtune.data import load_builtin, write_jsonl

TEMPLATE = "Review: {text}\\nIs this review positive? Answer yes or no."
LABELS = "negative=no,positive=yes"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli-tuned")
    recs = list(load_builtin("reviews"))
    write_jsonl(d / "train.jsonl", recs[:24])
    write_jsonl(d / "val.jsonl", recs[24:36])
    write_jsonl(d / "test.jsonl", recs[36:48])
    return d


def fit(tiny_model_dir, files, out, *extra):
    return main(["fit", "--model", str(tiny_model_dir), "--train", str(files / "train.jsonl"), "--template", TEMPLATE,
                 "--label-words", LABELS, "--out", str(out), "--no-cache", *extra])


def test_lora_fit_eval_predict_merge(tiny_model_dir, files, tmp_path, capsys):
    run = tmp_path / "lora"
    assert fit(tiny_model_dir, files, run, "--method", "lora", "--rank", "4", "--alpha", "8",
               "--target", "q_proj,v_proj", "--epochs", "2", "--lr", "0.01", "--val", str(files / "val.jsonl"),
               "--json") == 0
    card = json.loads(capsys.readouterr().out)
    assert card["method"] == "lora" and card["hyperparameters"]["rank"] == 4
    assert card["training"]["n_val"] == 12 and len(card["training"]["train"]["history"]) == 2
    assert (run / "adapter_model.safetensors").is_file()

    assert main(["eval", str(run), "--data", str(files / "test.jsonl"), "--json", "--no-cache"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["method"] == "lora" and ev["data"]["n"] == 12 and "flips" in ev

    assert main(["predict", str(run), "--data", str(files / "test.jsonl"), "--no-cache"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 12

    merged = tmp_path / "merged"
    assert main(["merge", str(run), "--out", str(merged)]) == 0
    capsys.readouterr()
    assert (merged / "config.json").is_file() and (merged / "card.json").is_file()
    assert main(["predict", str(merged), "--data", str(files / "test.jsonl"), "--no-cache"]) == 0
    merged_rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for a, b in zip(rows, merged_rows):
        assert a["label"] == b["label"]
        np.testing.assert_allclose(list(a["probabilities"].values()), list(b["probabilities"].values()), atol=1e-5)


def test_each_method_fits_from_the_cli(tiny_model_dir, files, tmp_path, capsys):
    for method, extra in (("prompt-tuning", ["--virtual-tokens", "4"]), ("adapter", ["--bottleneck", "8"]),
                          ("last-layers", ["--layers", "1"]), ("norm-tuning", []), ("full", [])):
        out = tmp_path / method
        assert fit(tiny_model_dir, files, out, "--method", method, "--max-steps", "2", *extra) == 0, method
        assert f"saved {method} run" in capsys.readouterr().out
        assert main(["eval", str(out), "--data", str(files / "test.jsonl"), "--json", "--no-cache"]) == 0
        assert json.loads(capsys.readouterr().out)["method"] == method


def test_options_that_do_not_apply_are_refused(tiny_model_dir, files, tmp_path, capsys):
    assert fit(tiny_model_dir, files, tmp_path / "x", "--method", "adapter", "--rank", "4") == 2
    assert "--rank does not apply to --method adapter" in capsys.readouterr().err
    assert fit(tiny_model_dir, files, tmp_path / "x", "--method", "closed-form", "--epochs", "2") == 2
    assert "--epochs does not apply to --method closed-form" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_merge_refuses_a_method_without_low_rank_updates(tiny_model_dir, files, tmp_path, capsys):
    run = tmp_path / "norm"
    assert fit(tiny_model_dir, files, run, "--method", "norm-tuning", "--max-steps", "1") == 0
    capsys.readouterr()
    assert main(["merge", str(run), "--out", str(tmp_path / "m")]) == 2
    assert "can be merged" in capsys.readouterr().err


def test_kill_resume_from_the_cli_matches_an_uninterrupted_run(tiny_model_dir, files, tmp_path, capsys):
    """--checkpoint-dir and --resume reach the loop: a run resumed from a finished checkpoint is identical."""
    ck = tmp_path / "ck"
    args = ["--method", "lora", "--epochs", "2", "--lr", "0.01", "--checkpoint-dir", str(ck), "--json"]
    assert fit(tiny_model_dir, files, tmp_path / "a", *args) == 0
    first = json.loads(capsys.readouterr().out)
    assert fit(tiny_model_dir, files, tmp_path / "b", *args, "--resume") == 0
    second = json.loads(capsys.readouterr().out)
    assert second["training"]["train"]["resumed_from_step"] == first["training"]["train"]["steps"]
    a = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "adapter_model.safetensors").read_bytes()


def test_a_token_budget_reaches_the_loop_and_leaves_the_adapter_unchanged(tiny_model_dir, files, tmp_path, capsys):
    """--max-batch-tokens cuts the batches (here: one prompt per forward pass) and trains the same adapter."""
    import torch
    from safetensors.torch import load_file

    args = ["--method", "lora", "--dropout", "0", "--epochs", "1", "--lr", "0.01", "--batch-size", "4", "--json"]
    assert fit(tiny_model_dir, files, tmp_path / "a", *args) == 0
    whole = json.loads(capsys.readouterr().out)
    assert fit(tiny_model_dir, files, tmp_path / "b", *args, "--max-batch-tokens", "1") == 0
    cut = json.loads(capsys.readouterr().out)
    assert whole["training"]["config"]["max_batch_tokens"] is None
    assert cut["training"]["config"]["max_batch_tokens"] == 1
    a = load_file(tmp_path / "a" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4)  # float rounding through AdamW
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)  # training moved the adapter


def test_fit_runs_unchanged_under_torchrun(tiny_model_dir, files, tmp_path, monkeypatch):
    """Two gloo processes, each half of every batch, give the single-process adapter (dropout off)."""
    monkeypatch.setenv("LMTUNE_DEVICE", "cpu")  # both runs on the CPU, also where a GPU is present
    import os
    import socket
    import subprocess
    import sys

    from safetensors.torch import load_file

    args = ["fit", "--model", str(tiny_model_dir), "--train", str(files / "train.jsonl"), "--template", TEMPLATE,
            "--label-words", LABELS, "--no-cache", "--method", "lora", "--dropout", "0", "--epochs", "2",
            "--lr", "0.01", "--batch-size", "8", "--json"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # LMTUNE_DEVICE=cpu included
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(port), "-m", "lmtune.cli", *args, "--out", str(tmp_path / "two")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    two = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    assert one.keys() == two.keys()
    for k in one:
        np.testing.assert_allclose(two[k].numpy(), one[k].numpy(), atol=1e-5, rtol=1e-4)
    assert max(float(one[k].abs().max()) for k in one if "lora_B" in k) > 1e-3  # B moved away from zero

"""Tests for lmtune.training: the one training loop, on a tiny MLP over synthetic data.

The subprocess tests run ``tests/_resume_worker.py`` (SIGKILLed mid-run, then resumed) and
``tests/_ddp_worker.py`` (under torchrun with 2 processes, against 1 process).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import _ddp_worker
import _resume_worker
from _resume_worker import N_TRAIN, problem
from lmtune.errors import LmtuneError
from lmtune.training import (
    CHECKPOINT_FILE,
    TrainConfig,
    TrainingDiverged,
    TrainResult,
    batch_order,
    lr_factor,
    micro_batches,
    plan,
    train,
)

TESTS = Path(__file__).parent
ROOT = TESTS.parent


def _snapshot(params) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in params.items()}


def _assert_params_equal(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for n in a:
        if atol == 0.0:
            assert torch.equal(a[n], b[n]), n
        else:
            torch.testing.assert_close(a[n], b[n], atol=atol, rtol=0, msg=n)


def _mean_loss(loss_fn) -> float:
    with torch.no_grad():
        return float(loss_fn(list(range(N_TRAIN)))[0]) / N_TRAIN


# ----------------------------------------------------------------------------------------------------
# Configuration, schedule, batch order.

def test_lr_factor_warmup_then_decay():
    T, w = 10, 2
    assert [lr_factor(s, T, w, "constant") for s in range(4)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    assert lr_factor(6, T, w, "cosine") == pytest.approx(0.5)  # p = 4/8
    assert lr_factor(6, T, w, "linear") == pytest.approx(0.5)
    assert lr_factor(4, T, w, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(9, T, w, "cosine") == pytest.approx(0.5 * (1 + math.cos(7 * math.pi / 8)))  # > 0: not wasted
    assert lr_factor(9, T, w, "linear") == pytest.approx(1 / 8)
    assert lr_factor(0, T, 0, "cosine") == 1.0


def test_plan_counts_steps_and_warmup():
    assert plan(TrainConfig(epochs=5, batch_size=8, warmup=0.06), 80) == (50, 3)  # not ceil(3.0000000000000004)
    assert plan(TrainConfig(epochs=3, batch_size=8, warmup=0.1), 81) == (33, 4)  # 11 steps/epoch
    assert plan(TrainConfig(epochs=3, batch_size=8, warmup=5, max_steps=7), 80) == (7, 5)
    assert plan(TrainConfig(epochs=1, batch_size=8, warmup=50), 16) == (2, 2)


def test_config_validation_and_round_trip():
    with pytest.raises(LmtuneError, match="schedule"):
        TrainConfig(schedule="cos")
    with pytest.raises(LmtuneError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(LmtuneError, match="unknown training setting.*lrate"):
        TrainConfig.from_dict({"lrate": 1.0})
    cfg = TrainConfig(lr=3e-3, patience=2, clip=None)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_batch_order_is_a_deterministic_permutation():
    n, bs = 37, 8
    order = batch_order(n, bs, seed=1, epoch=0)
    assert [len(b) for b in order] == [8, 8, 8, 8, 5]
    assert sorted(i for b in order for i in b) == list(range(n))
    assert order == batch_order(n, bs, seed=1, epoch=0)
    assert order != batch_order(n, bs, seed=1, epoch=1)
    assert order != batch_order(n, bs, seed=2, epoch=0)


def test_batch_order_groups_by_length():
    n, bs = 1000, 10
    lengths = np.random.default_rng(0).integers(1, 500, n)
    order = batch_order(n, bs, seed=0, epoch=0, lengths=lengths)
    assert sorted(i for b in order for i in b) == list(range(n))
    assert order == batch_order(n, bs, seed=0, epoch=0, lengths=lengths)
    spread = np.mean([np.ptp(lengths[b]) for b in order])
    random_spread = np.mean([np.ptp(lengths[b]) for b in batch_order(n, bs, seed=0, epoch=0)])
    assert spread < 0.1 * random_spread
    assert lengths.argmax() in order[0]  # the longest batch first: out-of-memory shows on step 1
    # batches are shuffled, not sorted longest to shortest across the epoch
    maxima = [lengths[b].max() for b in order[1:]]
    assert maxima != sorted(maxima, reverse=True)


def test_micro_batches_partition_the_global_batch():
    batch = list(range(11))
    parts = [micro_batches(batch, r, 2, 3) for r in range(2)]
    assert [len(m) for m in parts[0]] == [2, 2, 2] and [len(m) for m in parts[1]] == [2, 2, 1]
    assert sorted(i for p in parts for m in p for i in m) == batch
    assert micro_batches([5], 1, 2, 2) == []  # nothing for this process


def test_token_budget_cuts_only_the_micro_batches_above_it():
    lengths = [10, 10, 10, 10, 30, 5, 5, 5, 5, 50]
    # 4 x 10 = 40 padded tokens fit a budget of 40; 30 and three 5s pad to 4 x 30 = 120: two parts fit 60
    parts = micro_batches([0, 1, 2, 3], 0, 1, 1, lengths, 40)
    assert parts == [[0, 1, 2, 3]]
    parts = micro_batches([4, 5, 6, 7], 0, 1, 1, lengths, 60)
    assert parts == [[4, 5], [6, 7]]  # 2 x 30 = 60 fits
    for budget in (1, 7, 25, 49, 64, 100, 500):
        for batch in ([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [9, 8, 7, 6, 5], [4, 9]):
            parts = micro_batches(batch, 0, 1, 1, lengths, budget)
            assert [i for p in parts for i in p] == batch  # the same examples, in order
            # every part fits, or is one example (longer than the budget on its own)
            assert all(len(p) * max(lengths[i] for i in p) <= budget or len(p) == 1 for p in parts)
            # the fewest near-equal parts: with one part fewer, some part of two or more would not fit
            k = len(parts)
            if k > 1:
                fewer = np.array_split(np.asarray(batch), k - 1)
                assert any(len(p) > 1 and len(p) * max(lengths[i] for i in p) > budget for p in fewer)
    # with processes and accumulation: the budget applies to each of their parts
    parts = micro_batches(list(range(10)), 1, 2, 1, lengths, 40)
    assert [i for p in parts for i in p] == [1, 3, 5, 7, 9]
    assert parts == [[1, 3], [5, 7], [9]]


def test_token_budget_does_not_change_the_result_and_needs_lengths():
    cfg = TrainConfig(epochs=2, lr=2e-2, batch_size=8, weight_decay=0.01, clip=0.5)
    _, ref, loss_fn, _, lengths = problem()
    train(ref, loss_fn, N_TRAIN, cfg, lengths=lengths, progress=False)

    _, params, loss_fn, _, lengths = problem()
    sizes = []

    def recording_loss(idx):
        sizes.append((len(idx), max(lengths[i] for i in idx)))
        return loss_fn(idx)

    budget = TrainConfig(**{**cfg.to_dict(), "max_batch_tokens": 20})
    train(params, recording_loss, N_TRAIN, budget, lengths=lengths, progress=False)
    assert all(n * m <= 20 or n == 1 for n, m in sizes)
    assert len(sizes) > 2 * N_TRAIN // 8  # batches were cut
    _assert_params_equal(_snapshot(params), _snapshot(ref), atol=1e-6)
    with pytest.raises(LmtuneError, match="max_batch_tokens needs the examples' lengths"):
        train(params, loss_fn, N_TRAIN, budget, progress=False)
    with pytest.raises(LmtuneError, match="max_batch_tokens must be an integer >= 1"):
        TrainConfig(max_batch_tokens=0)


# ----------------------------------------------------------------------------------------------------
# The loop on one process.

def test_training_lowers_the_loss():
    _, params, loss_fn, _, lengths = problem()
    before = _mean_loss(loss_fn)
    cfg = TrainConfig(epochs=6, lr=3e-2, batch_size=8, warmup=0.1)
    result = train(params, loss_fn, N_TRAIN, cfg, lengths=lengths, progress=False)
    after = _mean_loss(loss_fn)
    assert after < 0.5 * before, (before, after)
    assert result.steps == 6 * 5 and result.epochs_run == 6 and not result.stopped_early
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4, 5, 6]
    assert all(h["val"] is None and h["examples_per_s"] > 0 and h["tokens_per_s"] > 0 for h in result.history)
    assert result.best_epoch is None and result.resumed_from_step is None
    json.dumps(result.to_dict())


def test_train_loss_is_the_mean_per_example_before_each_step():
    """With lr tiny the parameters barely move, so an epoch's train_loss is the initial mean loss."""
    _, params, loss_fn, _, _ = problem()
    before = _mean_loss(loss_fn)
    result = train(params, loss_fn, N_TRAIN, TrainConfig(epochs=1, lr=1e-12, batch_size=6), progress=False)
    assert result.history[0]["train_loss"] == pytest.approx(before, rel=1e-6)


def test_the_optimizer_uses_the_scheduled_learning_rate():
    """AdamW's first step moves each weight by lr * g / (|g| + eps) ~ lr: here lr * 1/3 (warmup of 2)."""
    _, params, loss_fn, _, _ = problem()
    w0 = params["0.weight"].detach().clone()
    cfg = TrainConfig(epochs=10, lr=1e-2, batch_size=N_TRAIN, warmup=2, schedule="linear", clip=None)
    moves = []

    def on_step(step):
        if step == 1:
            moves.append((params["0.weight"].detach() - w0).abs())

    result = train(params, loss_fn, N_TRAIN, cfg, on_step=on_step, progress=False)
    torch.testing.assert_close(moves[0], torch.full_like(w0, 1e-2 / 3), rtol=1e-3, atol=0)
    expected = [1e-2 * lr_factor(s, 10, 2, "linear") for s in range(10)]
    assert [h["lr"] for h in result.history] == pytest.approx(expected)


@pytest.mark.parametrize("batch_size,grad_accum", [(8, 2), (8, 3), (7, 4)])
def test_gradient_accumulation_does_not_change_the_result(batch_size, grad_accum):
    cfg = TrainConfig(epochs=3, lr=2e-2, batch_size=batch_size, weight_decay=0.01, clip=0.5)
    _, ref, loss_fn, _, lengths = problem()
    train(ref, loss_fn, N_TRAIN, cfg, lengths=lengths, progress=False)

    _, params, loss_fn, _, lengths = problem()
    sizes = []

    def recording_loss(idx):
        sizes.append(len(idx))
        return loss_fn(idx)

    accum = TrainConfig(**{**cfg.to_dict(), "grad_accum": grad_accum})
    train(params, recording_loss, N_TRAIN, accum, lengths=lengths, progress=False)
    first_step = sizes[:grad_accum]
    assert sum(first_step) == batch_size and max(first_step) == -(-batch_size // grad_accum)
    _assert_params_equal(_snapshot(params), _snapshot(ref), atol=1e-6)


def test_weight_decay_skips_one_dimensional_parameters():
    lin = torch.nn.Linear(3, 2)
    params = dict(lin.named_parameters())
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()

    def zero_loss(idx):  # zero gradient: only weight decay moves anything
        return (lin.weight.sum() + lin.bias.sum()) * 0.0, len(idx)

    cfg = TrainConfig(epochs=1, lr=0.1, weight_decay=0.5, batch_size=4, warmup=0, schedule="constant")
    train(params, zero_loss, 4, cfg, progress=False)
    torch.testing.assert_close(lin.weight.detach(), w0 * (1 - 0.1 * 0.5))
    assert torch.equal(lin.bias.detach(), b0)


def test_clip_groups_clip_each_group_on_its_own():
    big = torch.nn.Parameter(torch.zeros(3))
    small = torch.nn.Parameter(torch.zeros(2))
    params = {"big": big, "small": small}

    def loss(idx):  # gradients 10 per coordinate of big, 0.1 of small
        return (10 * big.sum() + 0.1 * small.sum()) * len(idx), len(idx)

    seen = {}

    def grab(step, lr):
        seen[step] = {n: p.grad.detach().clone() for n, p in params.items()}

    cfg = TrainConfig(epochs=1, lr=0.1, batch_size=4, warmup=0, schedule="constant", clip=1.0)
    train(params, loss, 4, cfg, progress=False, after_update=grab)
    together = seen[1]  # one norm: small's share shrinks with big's
    torch.testing.assert_close(together["small"], torch.full((2,), 0.1 / math.sqrt(300 + 0.02)))
    train(params, loss, 4, cfg, progress=False, after_update=grab, clip_groups=[["big"], ["small"]])
    torch.testing.assert_close(seen[1]["big"], torch.full((3,), 1 / math.sqrt(3)))
    torch.testing.assert_close(seen[1]["small"], torch.full((2,), 0.1))  # under its own limit: untouched
    with pytest.raises(LmtuneError, match="exactly once"):
        train(params, loss, 4, cfg, progress=False, clip_groups=[["big"]])


@pytest.mark.parametrize("restore_best", [True, False])
def test_early_stopping_restores_the_best_epoch(restore_best):
    _, params, loss_fn, _, _ = problem()
    scripted = iter([0.1, 0.5, 0.3, 0.2, 0.9, 1.0])
    seen = []

    def val_fn():
        assert not torch.is_grad_enabled()
        seen.append(_snapshot(params))
        return next(scripted)

    cfg = TrainConfig(epochs=6, lr=1e-2, batch_size=8, patience=2, restore_best=restore_best)
    result = train(params, loss_fn, N_TRAIN, cfg, val_fn=val_fn, progress=False)
    assert result.stopped_early and result.epochs_run == 4 and result.steps == 4 * 5
    assert (result.best_epoch, result.best_val) == (2, 0.5)
    assert [h["val"] for h in result.history] == [0.1, 0.5, 0.3, 0.2]
    _assert_params_equal(_snapshot(params), seen[1] if restore_best else seen[3])
    assert not torch.equal(seen[1]["0.weight"], seen[3]["0.weight"])


def test_nan_loss_raises_naming_the_step_and_keeps_the_last_good_parameters():
    _, params, loss_fn, _, _ = problem()
    done = {"steps": 0}
    after = {}

    def bad_loss(idx):
        loss, tokens = loss_fn(idx)
        return (loss * float("nan"), tokens) if done["steps"] == 2 else (loss, tokens)

    def on_step(step):
        done["steps"] = step
        after[step] = _snapshot(params)

    cfg = TrainConfig(epochs=2, lr=1e-2, batch_size=8)
    message = r"step 3 \(epoch 1, lr [0-9.e-]+\).*loss is nan.*lower learning rate"
    with pytest.raises(TrainingDiverged, match=message):
        train(params, bad_loss, N_TRAIN, cfg, on_step=on_step, progress=False)
    _assert_params_equal(_snapshot(params), after[2])


def test_infinite_gradient_raises_even_when_the_loss_is_finite():
    _, params, loss_fn, _, _ = problem()

    def inf_grad_loss(idx):
        loss, tokens = loss_fn(idx)
        h = params["3.bias"] * 1.0
        h.register_hook(lambda g: g + float("inf"))
        return loss + h.sum() * 0.0, tokens

    with pytest.raises(TrainingDiverged, match=r"step 1 .*gradient norm is (inf|nan)"):
        train(params, inf_grad_loss, N_TRAIN, TrainConfig(epochs=1, batch_size=8), progress=False)


def test_bad_inputs_are_reported():
    _, params, loss_fn, _, lengths = problem()
    with pytest.raises(LmtuneError, match="lengths has 3 entries for 40"):
        train(params, loss_fn, N_TRAIN, TrainConfig(), lengths=[1, 2, 3], progress=False)
    frozen = {"w": torch.nn.Parameter(torch.zeros(2), requires_grad=False)}
    with pytest.raises(LmtuneError, match="w do not require grad"):
        train(frozen, loss_fn, N_TRAIN, TrainConfig(), progress=False)
    with pytest.raises(LmtuneError, match="scalar tensor that requires grad"):
        train(params, lambda idx: (1.0, 0), N_TRAIN, TrainConfig(), progress=False)


def test_progress_bar_shows_loss_and_throughput(capsys):
    _, params, loss_fn, _, lengths = problem()
    train(params, loss_fn, N_TRAIN, TrainConfig(epochs=1, batch_size=8), lengths=lengths, progress=True,
          desc="tiny")
    err = capsys.readouterr().err
    assert "tiny" in err and "5/5" in err and "loss=" in err and "ex_s=" in err and "tok_s=" in err
    train(params, loss_fn, N_TRAIN, TrainConfig(epochs=1, batch_size=8), progress=False)
    assert capsys.readouterr().err == ""


# ----------------------------------------------------------------------------------------------------
# Checkpoints.

def _ckpt_config(tmp_path, **kw):
    base = dict(epochs=3, lr=2e-2, batch_size=8, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=2)
    return TrainConfig(**{**base, **kw})


def test_checkpoint_is_written_atomically_and_resume_checks_the_config(tmp_path):
    _, params, loss_fn, val_fn, _ = problem()
    cfg = _ckpt_config(tmp_path)
    first = train(params, loss_fn, N_TRAIN, cfg, val_fn=val_fn, progress=False)
    assert sorted(os.listdir(tmp_path / "ckpt")) == [CHECKPOINT_FILE]  # no temp files left behind
    state = torch.load(tmp_path / "ckpt" / CHECKPOINT_FILE, weights_only=True)
    assert state["progress"]["step"] == 15 and state["progress"]["finished"]

    with pytest.raises(LmtuneError, match=r"cannot resume .*lr=0.02 \(now 0.05\)"):
        train(params, loss_fn, N_TRAIN, _ckpt_config(tmp_path, lr=5e-2), val_fn=val_fn, resume=True)
    with pytest.raises(LmtuneError, match="number of training examples differs"):
        train(params, loss_fn, N_TRAIN - 1, cfg, val_fn=val_fn, resume=True)

    # resuming a finished run changes nothing and returns its result; checkpoint_every may change
    final = _snapshot(params)
    with torch.no_grad():
        for p in params.values():
            p.add_(1.0)
    again = train(params, loss_fn, N_TRAIN, _ckpt_config(tmp_path, checkpoint_every=0), val_fn=val_fn,
                  resume=True, progress=False)
    assert again.resumed_from_step == 15 and again.steps == 15
    assert [h["train_loss"] for h in again.history] == [h["train_loss"] for h in first.history]
    _assert_params_equal(_snapshot(params), final)


def test_resume_without_a_checkpoint_starts_afresh(tmp_path):
    _, params, loss_fn, _, _ = problem()
    result = train(params, loss_fn, N_TRAIN, _ckpt_config(tmp_path), resume=True, progress=False)
    assert result.resumed_from_step is None and result.steps == 15
    with pytest.raises(LmtuneError, match="checkpoint_dir"):
        train(params, loss_fn, N_TRAIN, TrainConfig(), resume=True)


@contextlib.contextmanager
def _one_thread():
    """Run a worker's ``main`` in this process as its subprocess would: one thread (the workers have
    OMP_NUM_THREADS=1, so the same kernels), and the global numpy/Python generators left as they were."""
    threads, np_state, py_state = torch.get_num_threads(), np.random.get_state(), random.getstate()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        np.random.set_state(np_state)
        random.setstate(py_state)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _start(args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait(proc: subprocess.Popen, timeout=120) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(proc.args)} did not finish in {timeout} s (a hang?): {err[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _run(args, timeout=120) -> subprocess.CompletedProcess:
    return _wait(_start(args), timeout)


def test_killed_run_resumes_bit_identically(tmp_path):
    """SIGKILL mid-epoch (step 4, checkpoint at 3), resume; SIGKILL after an epoch end (11; checkpoint at
    10), resume to the end: the parameters equal an uninterrupted run's bit for bit."""
    worker = TESTS / "_resume_worker.py"
    ref, run = tmp_path / "ref", tmp_path / "run"
    ref.mkdir(), run.mkdir()
    killed = _start([worker, run, "--kill-at", 4])
    with _one_thread():
        _resume_worker.main([str(ref)])  # the uninterrupted run, here, while the first worker runs
    killed = _wait(killed)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    state = torch.load(run / "ckpt" / CHECKPOINT_FILE, weights_only=True)
    assert (state["progress"]["step"], state["progress"]["pos"]) == (3, 3)
    killed = _run([worker, run, "--kill-at", 11, "--resume"])
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    state = torch.load(run / "ckpt" / CHECKPOINT_FILE, weights_only=True)
    assert (state["progress"]["step"], state["progress"]["epoch"], state["progress"]["pos"]) == (10, 2, 0)
    done = _run([worker, run, "--resume"])
    assert done.returncode == 0, done.stderr

    _assert_params_equal(torch.load(run / "params.pt"), torch.load(ref / "params.pt"))
    a, b = json.loads((ref / "result.json").read_text()), json.loads((run / "result.json").read_text())
    assert b["resumed_from_step"] == 10 and a["resumed_from_step"] is None and a["steps"] == b["steps"] == 20
    for key in ("epoch", "steps", "train_loss", "val", "lr"):
        assert [h[key] for h in a["history"]] == [h[key] for h in b["history"]], key
    assert (a["best_epoch"], a["best_val"]) == (b["best_epoch"], b["best_val"])


# ----------------------------------------------------------------------------------------------------
# torchrun.

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out: Path, *args) -> subprocess.CompletedProcess:
    if not torch.distributed.is_available():
        pytest.skip("this torch build has no torch.distributed")
    return _start(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                   "--master_port", _free_port(), TESTS / "_ddp_worker.py", out, *args])


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """One torchrun launch (2 processes x 2 micro-batches, then a diverging run) and, alongside, the same
    worker as 1 process x 1 micro-batch (in this process, where WORLD_SIZE is unset): the same global
    batch of 8."""
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    double = _torchrun(two, "--grad-accum", 2, "--nan-at", 3)
    with _one_thread():
        _ddp_worker.main([str(one)])  # the single process runs here, while torchrun's two run
    double = _wait(double)
    assert double.returncode == 0, double.stderr + double.stdout
    return one, two


def test_two_processes_match_one_process(ddp_runs):
    one, two = ddp_runs
    a, b = torch.load(one / "params.pt"), torch.load(two / "params.pt")
    _assert_params_equal(b, a, atol=1e-6)
    moved = max(float((a[n] - p.detach()).abs().max()) for n, p in problem()[1].items())
    assert moved > 0.05  # the comparison is not between two untrained models
    ra, rb = json.loads((one / "result.json").read_text()), json.loads((two / "result.json").read_text())
    assert (ra["world"], rb["world"], ra["steps"], rb["steps"]) == (1, 2, 15, 15)
    for h1, h2 in zip(ra["history"], rb["history"], strict=True):
        assert h2["train_loss"] == pytest.approx(h1["train_loss"], abs=1e-6)
        assert h2["val"] == pytest.approx(h1["val"], abs=1e-6)
    state = torch.load(two / "ckpt" / CHECKPOINT_FILE, weights_only=True)
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])


def test_divergence_on_one_process_stops_every_process(ddp_runs):
    _, two = ddp_runs
    for rank in (0, 1):
        msg = (two / f"diverged_{rank}.txt").read_text()
        assert msg.startswith("training diverged at step 3 (epoch 1, lr ") and "loss is nan" in msg


def test_train_result_to_dict_is_json_safe():
    r = TrainResult(steps=1, epochs_run=1, seconds=0.1, history=[{"val": float("nan")}], best_val=float("inf"))
    assert json.loads(json.dumps(r.to_dict()))["history"][0]["val"] is None

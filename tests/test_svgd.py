"""SVGD: the update against a naive loop, a known 2-D Gaussian, the one-particle (MAP) limit, the particle
surrogate loss, and LoraClassifier(bayes="svgd") end to end on the tiny model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lmtune.errors import LmtuneError
from lmtune.svgd import ParticleSet, median_bandwidth, svgd_direction, svgd_step

F64 = torch.float64


def test_direction_equals_the_formula_with_autograd_kernel_gradients():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(5, 3, generator=g, dtype=F64)
    score = torch.randn(5, 3, generator=g, dtype=F64)
    h = 1.7
    phi, used = svgd_direction(X, score, bandwidth=h)
    assert used == h
    naive = torch.zeros_like(X)
    for i in range(5):
        for j in range(5):
            xj = X[j].clone().requires_grad_(True)
            k = torch.exp(-((xj - X[i]) ** 2).sum() / h)
            (grad_k,) = torch.autograd.grad(k, xj)
            naive[i] += k.detach() * score[j] + grad_k
    torch.testing.assert_close(phi, naive / 5, rtol=1e-12, atol=1e-12)


def test_median_bandwidth():
    X = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 1.0]], dtype=F64)
    # squared distances 9, 1, 10: median 9
    assert median_bandwidth(X) == pytest.approx(9 / math.log(4))
    assert median_bandwidth(X[:1]) == 1.0


def test_one_particle_is_exactly_gradient_ascent():
    x = torch.tensor([[0.3, -1.2, 2.0]], dtype=F64)
    score_fn = lambda X: -2.0 * (X - 1.0)  # noqa: E731
    torch.testing.assert_close(svgd_step(x, score_fn, lr=0.05), x + 0.05 * score_fn(x), rtol=0, atol=0)


def test_svgd_recovers_a_2d_gaussian():
    mu = torch.tensor([1.0, -2.0], dtype=F64)
    Sigma = torch.tensor([[1.0, 0.6], [0.6, 2.0]], dtype=F64)
    P = torch.linalg.inv(Sigma)
    X = torch.randn(200, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 0.5
    for _ in range(500):
        X = svgd_step(X, lambda Z: -(Z - mu) @ P, lr=0.5)
    torch.testing.assert_close(X.mean(0), mu, atol=0.02, rtol=0)
    # 200 particles with the median heuristic shrink the spread a little (a known finite-n effect): 10%
    torch.testing.assert_close(torch.cov(X.T), Sigma, rtol=0.1, atol=0.05)
    # without the repulsive term every particle would collapse onto the mode
    Y = X.clone()
    for _ in range(200):
        Y = Y + 0.5 * (-(Y - mu) @ P)
    assert torch.cov(Y.T).abs().max() < 1e-6


def test_svgd_direction_checks_shapes():
    with pytest.raises(LmtuneError, match=r"must both be \(n, D\)"):
        svgd_direction(torch.zeros(3, 2), torch.zeros(2, 2))


class Quadratic(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2, bias=False, dtype=F64)


def _particles(n):
    model = Quadratic()
    params = {"lin.weight": model.lin.weight}
    gen = torch.Generator().manual_seed(1)

    def reinit(i):
        model.lin.weight.copy_(torch.randn(2, 3, generator=gen, dtype=F64))

    return model, ParticleSet(model, params, n, reinit)


def test_particle_set_swaps_parameters_in_and_back():
    model, ps = _particles(3)
    assert len(ps) == 3 and ps.particles[0]["lin.weight"] is model.lin.weight
    w0 = model.lin.weight.detach().clone()
    assert not torch.equal(ps.particles[1]["lin.weight"], ps.particles[2]["lin.weight"])
    with ps.swap(2):
        assert model.lin.weight is ps.particles[2]["lin.weight"]
    assert model.lin.weight is ps.particles[0]["lin.weight"] and torch.equal(model.lin.weight, w0)
    assert set(ps.named_parameters()) == {f"particle{i}.lin.weight" for i in range(3)}
    with pytest.raises(LmtuneError, match="at least 1"):
        ParticleSet(model, {"lin.weight": model.lin.weight}, 0, lambda i: None)


def test_surrogate_loss_gradient_is_minus_n_phi_over_big_n_and_its_value_the_mean_loss():
    model, ps = _particles(3)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    y = torch.tensor([0, 1, 1, 0])
    N, m, delta, T = 40, 4, 0.5, 2.0
    loss_of = lambda: torch.nn.functional.cross_entropy(model.lin(x), y, reduction="sum")  # noqa: E731
    loss = ps.loss(loss_of, m, N, prior_precision=delta, temperature=T)
    loss.backward()
    thetas, scores, values = [], [], []
    for i in range(3):
        w = ps.particles[i]["lin.weight"].detach().clone().requires_grad_(True)
        ce = torch.nn.functional.cross_entropy(x @ w.T, y, reduction="sum")
        (g,) = torch.autograd.grad(ce, w)
        thetas.append(w.detach().reshape(-1))
        scores.append((-(N / m) * g / T - delta * w.detach()).reshape(-1))
        values.append(float(ce.detach()))
    phi, _ = svgd_direction(torch.stack(thetas), torch.stack(scores))
    for i in range(3):
        torch.testing.assert_close(ps.particles[i]["lin.weight"].grad.reshape(-1), -(m * 3 / N) * phi[i])
    assert float(loss.detach()) == pytest.approx(np.mean(values))


def test_prior_step_is_the_priors_part_of_the_svgd_direction_at_gradient_scale():
    model, ps = _particles(3)
    X = torch.stack([ps.flat(i).detach().clone() for i in range(3)])
    lr, delta, N = 0.1, 2.0, 10
    phi, h = svgd_direction(X, -delta * X)  # the prior's score alone, kernel at the same bandwidth
    repulse, _ = svgd_direction(X, torch.zeros_like(X), h)
    ps.last_bandwidth = h
    ps.prior_step(lr, delta, N)
    after = torch.stack([ps.flat(i).detach() for i in range(3)])
    torch.testing.assert_close(after, X + lr * 3 / N * (phi - repulse))
    # one particle: AdamW-style decoupled decay by lr * delta / N
    model, one = _particles(1)
    w = model.lin.weight.detach().clone()
    one.prior_step(lr, delta, N)
    torch.testing.assert_close(model.lin.weight.detach(), w * (1 - lr * delta / N))


# ----------------------------------------------------------------------------------------------------
# LoraClassifier(bayes="svgd") on the tiny Llama.

TEMPLATE = "Review: {text}\nIs this review positive? Answer yes or no."


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from lmtune.data import load_builtin, write_jsonl

    d = tmp_path_factory.mktemp("svgd")
    recs = list(load_builtin("reviews"))
    write_jsonl(d / "train.jsonl", recs[:24])
    write_jsonl(d / "test.jsonl", recs[24:34])
    return d


def _lora(tiny_lm, **kw):
    import lmtune
    from lmtune.tasks import ClassificationTask

    task = ClassificationTask(TEMPLATE, "negative=no,positive=yes")
    return lmtune.LoraClassifier(tiny_lm, task, rank=4, alpha=8, lr=1e-2, batch_size=8, progress=False, cache=False,
                                 **kw)


@pytest.fixture(scope="module")
def svgd_run(tiny_lm, data_dir):
    est = _lora(tiny_lm, epochs=2, bayes="svgd", particles=3, val=data_dir / "test.jsonl")
    return est.fit(data_dir / "train.jsonl")


def test_lora_svgd_trains_distinct_particles_and_predicts_their_average(svgd_run, data_dir):
    from lmtune.methods.base import softmax
    from lmtune.methods.tuned import TunedClassifier
    from safetensors.torch import load_file

    est = svgd_run
    assert len(est.particle_dirs_) == 3
    weights = [load_file(str(d / "adapter_model.safetensors")) for d in est.particle_dirs_]
    key = next(k for k in weights[0] if "lora_B" in k)
    assert not torch.allclose(weights[0][key], weights[1][key]) and not torch.allclose(weights[1][key], weights[2][key])
    p = est.predict_proba(data_dir / "test.jsonl")
    per = []
    for d in est.particle_dirs_:
        est.adapter_dir_ = d
        per.append(softmax(TunedClassifier.label_logits(est, data_dir / "test.jsonl")[0]))
    est.adapter_dir_ = est.particle_dirs_[0]
    np.testing.assert_allclose(p, np.mean(per, axis=0), atol=1e-12)
    info = est.posterior_info_
    assert info["kind"] == "svgd" and info["particles"] == 3 and info["last_bandwidth"] > 0
    assert info["params_per_particle"] * 3 == est.fit_info_["trainable_params"]
    assert info["seconds"] > 0 and info["peak_rss_bytes"] > 0
    assert est.fit_info_["train"]["best_epoch"] in (1, 2)  # the ensemble was validated each epoch


def test_lora_svgd_run_folder_holds_plain_peft_adapters_and_loads_identically(svgd_run, data_dir, tiny_lm, tmp_path):
    import lmtune
    from peft import PeftModel

    from lmtune.methods.peft_methods import quiet_peft

    run = svgd_run.save(tmp_path / "run")
    assert sorted(p.name for p in (run / "particles").iterdir()) == ["0", "1", "2"]
    with quiet_peft():
        pm = PeftModel.from_pretrained(tiny_lm.model, str(run / "particles" / "1"))
    assert any("lora_A" in n for n, _ in pm.named_parameters())
    pm.unload()
    card = json.loads((run / "card.json").read_text())
    assert card["hyperparameters"]["bayes"] == "svgd" and card["posterior"]["particles"] == 3
    back = lmtune.load_run(run, model=tiny_lm, progress=False, cache=False)
    np.testing.assert_allclose(back.predict_proba(data_dir / "test.jsonl"),
                               svgd_run.predict_proba(data_dir / "test.jsonl"), rtol=0, atol=1e-12)
    (run / "particles" / "2" / "adapter_model.safetensors").unlink()
    with pytest.raises(LmtuneError, match="incomplete"):
        lmtune.load_run(run, model=tiny_lm)


def test_one_particle_svgd_trains_the_same_adapter_as_plain_lora(tiny_lm, data_dir):
    from safetensors.torch import load_file

    # one particle: the kernel is 1 and its gradient 0, so SVGD is MAP training; a vanishing prior
    plain = _lora(tiny_lm, max_steps=4).fit(data_dir / "train.jsonl")
    svgd = _lora(tiny_lm, max_steps=4, bayes="svgd", particles=1, prior_precision=1e-12).fit(data_dir / "train.jsonl")
    a = load_file(str(plain.adapter_dir_ / "adapter_model.safetensors"))
    b = load_file(str(svgd.particle_dirs_[0] / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    test = data_dir / "test.jsonl"
    np.testing.assert_allclose(svgd.predict_proba(test), plain.predict_proba(test), atol=1e-5)


def test_particles_with_the_kernel_off_each_train_like_one_adapter(tiny_lm, data_dir, monkeypatch):
    from safetensors.torch import load_file

    import lmtune.svgd

    # a vanishing bandwidth makes k(x_i, x_j) = 0 between distinct particles and the repulsion exactly 0:
    # each particle must then get a single adapter's gradient, clipped on its own (a tight clip makes
    # clipping act on every step)
    monkeypatch.setattr(lmtune.svgd, "median_bandwidth", lambda X: 1e-30)
    kw = dict(max_steps=4, dropout=0.0, clip=1e-3)
    plain = _lora(tiny_lm, **kw).fit(data_dir / "train.jsonl")
    svgd = _lora(tiny_lm, bayes="svgd", particles=2, prior_precision=1e-12, **kw).fit(data_dir / "train.jsonl")
    a = load_file(str(plain.adapter_dir_ / "adapter_model.safetensors"))
    b = load_file(str(svgd.particle_dirs_[0] / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)


def test_one_particle_svgd_prior_is_adamw_weight_decay(tiny_lm, data_dir):
    from safetensors.torch import load_file

    # the prior, applied decoupled at the step's positions, is AdamW's weight decay delta / N on one particle
    N, delta = 24, 12.0
    plain = _lora(tiny_lm, max_steps=4, weight_decay=delta / N).fit(data_dir / "train.jsonl")
    svgd = _lora(tiny_lm, max_steps=4, bayes="svgd", particles=1, prior_precision=delta).fit(data_dir / "train.jsonl")
    undecayed = _lora(tiny_lm, max_steps=4).fit(data_dir / "train.jsonl")
    a, b, c = (load_file(str(d / "adapter_model.safetensors"))
               for d in (plain.adapter_dir_, svgd.particle_dirs_[0], undecayed.adapter_dir_))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)
    assert max(float((a[k] - c[k]).abs().max()) for k in a) > 1e-4  # the decay is visible


def test_svgd_uncertainty_in_predict_rows(svgd_run, data_dir):
    from lmtune.evaluate import predict_records

    rows = list(predict_records(svgd_run, data_dir / "test.jsonl"))
    assert len(rows) == 10
    for r in rows:
        assert set(r["uncertainty"]) == {"entropy", "logit_std"}
        assert r["uncertainty"]["logit_std"] > 0 and 0 < r["uncertainty"]["entropy"] <= math.log(2)


def test_cli_fit_eval_predict_svgd(tiny_model_dir, data_dir, tmp_path, capsys):
    from lmtune.cli import main

    run = tmp_path / "run"
    assert main(["fit", "--method", "lora", "--bayes", "svgd", "--particles", "2", "--model", str(tiny_model_dir),
                 "--train", str(data_dir / "train.jsonl"), "--template", "Review: {text}\\nPositive?",
                 "--label-words", "negative=no,positive=yes", "--rank", "4", "--max-steps", "2", "--svgd-temperature",
                 "0.5", "--out", str(run), "--no-cache", "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["posterior"]["particles"] == 2 and card["posterior"]["temperature"] == 0.5
    assert main(["eval", str(run), "--data", str(data_dir / "test.jsonl"), "--json", "--no-cache"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["method"] == "lora" and ev["data"]["n"] == 10 and "flips" in ev
    assert main(["predict", str(run), "--data", str(data_dir / "test.jsonl"), "--no-cache"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 10 and all("uncertainty" in r for r in rows)

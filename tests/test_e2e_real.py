"""End to end with the real default model (SmolLM2-135M-Instruct) on the built-in dataset.

One shared load of the model (the ``real_lm`` session fixture); the train and test features are
extracted once and then served by the on-disk feature cache.
"""

import json

import numpy as np
import pytest
import torch

import lmtune
from lmtune import cli, models
from lmtune.demo import DEMO_TEMPLATE, demo_task

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def fitted(real_lm):
    task = demo_task()
    zs = lmtune.ZeroShotClassifier(real_lm, task, progress=False).fit()
    cf = lmtune.ClosedFormClassifier(real_lm, task, progress=False).fit("builtin:reviews:train")
    return zs, cf


def test_closed_form_beats_zero_shot_by_a_clear_margin(fitted):
    zs, cf = fitted
    zs_eval = lmtune.evaluate(zs, "builtin:reviews:test")
    cf_eval = lmtune.evaluate(cf, "builtin:reviews:test")
    zs_acc, cf_acc = zs_eval["metrics"]["accuracy"], cf_eval["metrics"]["accuracy"]
    assert cf_acc >= zs_acc + 0.15, (zs_acc, cf_acc)
    assert cf_acc >= 0.75
    assert cf_eval["metrics"]["nll"] < zs_eval["metrics"]["nll"]
    f = cf_eval["flips"]
    assert f["wrong_to_right"] > f["right_to_wrong"]
    assert f["wrong_to_right"] - f["right_to_wrong"] == round((cf_acc - zs_acc) * f["n"])
    assert cf_eval["zero_shot"] == zs_eval["metrics"]


def test_save_load_gives_identical_predictions(fitted, real_lm, tmp_path):
    _, cf = fitted
    before = cf.predict_proba("builtin:reviews:test")
    loaded = lmtune.load_run(cf.save(tmp_path / "run"), progress=False)  # the model named in the card
    assert loaded.lm is real_lm
    np.testing.assert_array_equal(loaded.predict_proba("builtin:reviews:test"), before)


def test_cli_fit_eval_predict(fitted, tmp_path, capsys):
    run = tmp_path / "sentiment"
    args = ["--model", "smollm2-135m", "--template", DEMO_TEMPLATE, "--label-words", "negative=no,positive=yes"]
    assert cli.main(["fit", "--method", "closed-form", "--train", "builtin:reviews:train", "--out", str(run),
                     "--json", *args]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["fitted"]["lam"] == pytest.approx(fitted[1].lam_)
    assert cli.main(["eval", str(run), "--data", "builtin:reviews:test", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["metrics"]["accuracy"] == lmtune.evaluate(fitted[1], "builtin:reviews:test")["metrics"]["accuracy"]
    assert cli.main(["eval", "--zero-shot", "--data", "builtin:reviews:test", "--json", *args]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == ev["zero_shot"]
    assert cli.main(["predict", str(run), "--data", "builtin:reviews:test"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 200 and {r["label"] for r in rows} <= {"negative", "positive"}


def test_gguf_cache_matches_the_gguf_and_reloads_fast(real_lm):
    """The cached safetensors copy holds the GGUF's dequantized weights, bit for bit."""
    from transformers import AutoModelForCausalLM

    gguf = models.builtin_gguf_path("smollm2-135m")
    source, _ = models.resolve("smollm2-135m")
    assert (models.cache_dir() / "models").resolve() in models.Path(source).resolve().parents
    direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = real_lm.tokenizer("The service was slow but the food was great.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(direct(ids).logits, real_lm.model(ids).logits, rtol=0, atol=0)


@pytest.fixture(scope="module")
def lora_run(real_lm):
    """LoRA on q_proj and v_proj of the top 4 blocks, trained on half of the training split."""
    train = lmtune.open_data("builtin:reviews:train")
    half = lmtune.Dataset(train.records[::2], train.lines[::2], train.path)
    est = lmtune.LoraClassifier(real_lm, demo_task(), rank=8, alpha=16, target="q_proj,v_proj", layers=4, lr=1e-2,
                                epochs=3, batch_size=8, progress=False)
    return est.fit(half)


def test_lora_beats_zero_shot_on_the_builtin_dataset(fitted, lora_run):
    zs, _ = fitted
    ev = lmtune.evaluate(lora_run, "builtin:reviews:test")
    zs_acc = lmtune.evaluate(zs, "builtin:reviews:test")["metrics"]["accuracy"]
    assert ev["metrics"]["accuracy"] >= zs_acc + 0.15, (zs_acc, ev["metrics"])
    assert ev["metrics"]["nll"] < ev["zero_shot"]["nll"]
    info = lora_run.fit_info_
    assert info["reused_lower_layers"] == 26  # the 26 frozen blocks ran once, not every epoch
    assert info["trainable_share"] < 0.02
    losses = [h["train_loss"] for h in info["train"]["history"]]
    assert losses[-1] < losses[0]


def test_merged_real_lora_predicts_like_the_adapter(lora_run):
    from lmtune.merge import merged_lm

    data = lmtune.open_data("builtin:reviews:test")
    few = lmtune.Dataset(data.records[:24], data.lines[:24], data.path)
    merged = lmtune.ZeroShotClassifier(merged_lm(lora_run), lora_run.task, progress=False, cache=False).fit()
    np.testing.assert_allclose(merged.predict_proba(few), lora_run.predict_proba(few), atol=1e-4)



@pytest.fixture(scope="module")
def laplace_run(real_lm):
    """The ``lora_run`` adapter's setting trained for 8 epochs instead of 3, with its KFAC Laplace posterior.

    Laplace-LoRA's regime (Yang et al. 2024): an adapter trained on little data until its MAP predictions
    are overconfident. The linearised predictive can only widen the MAP's logits, so it corrects
    overconfidence; the 3-epoch adapter of ``lora_run`` is on the other side (temperature scaling sharpens
    it, T < 1), where no posterior can help and the test would assert the impossible.
    """
    train = lmtune.open_data("builtin:reviews:train")
    half = lmtune.Dataset(train.records[::2], train.lines[::2], train.path)
    est = lmtune.LoraClassifier(real_lm, demo_task(), rank=8, alpha=16, target="q_proj,v_proj", layers=4, lr=1e-2,
                                epochs=8, batch_size=8, progress=False, bayes="laplace")
    return est.fit(half)


def test_laplace_on_the_real_lora_lowers_ece_and_nll_at_the_same_accuracy(laplace_run):
    """KFAC Laplace on the trained adapter (issue 4): better calibrated, same answers within noise.

    MAP predictions (the same estimator with ``bayes=None``) against the linearised predictive of the same
    adapter, so the comparison isolates the posterior. The prior precision is chosen on the half of the
    training split the adapter did not see (``prior_method="val"``, applied after the fit): the evidence
    alone can collapse the posterior onto the MAP on this adapter (it did with 2 threads, not with 1: see
    :func:`lmtune.laplace.tune_prior_on_validation`), so with it the test asserts only "no worse than MAP".
    """
    import copy

    from lmtune.calibration import TemperatureScaled
    from lmtune.laplace import tune_prior_on_validation

    train = lmtune.open_data("builtin:reviews:train")
    other_half = lmtune.Dataset(train.records[1::2], train.lines[1::2], train.path)  # not trained on
    test = lmtune.open_data("builtin:reviews:test")
    map_view = copy.copy(laplace_run)
    map_view.bayes = None
    m_map = lmtune.evaluate(map_view, test)["metrics"]
    # the regime the fixture's docstring claims: the MAP is overconfident (temperature scaling softens it)
    assert TemperatureScaled(map_view).fit(other_half).temperature_ > 1.5
    info = laplace_run.posterior_info_
    assert info["prior_precision_tuned"] and np.isfinite(info["log_marginal_likelihood"])
    m_evidence = lmtune.evaluate(laplace_run, test)["metrics"]
    assert m_evidence["nll"] <= m_map["nll"] + 1e-6, (m_map, m_evidence)

    tuning = tune_prior_on_validation(laplace_run, other_half)
    m_la = lmtune.evaluate(laplace_run, test)["metrics"]
    noise = 2 * np.sqrt(m_map["accuracy"] * (1 - m_map["accuracy"]) / len(test))  # two binomial standard errors
    assert abs(m_la["accuracy"] - m_map["accuracy"]) <= noise, (m_map, m_la)
    assert m_la["nll"] < m_map["nll"], (m_map, m_la, tuning["chosen"])
    assert m_la["ece"] < m_map["ece"], (m_map, m_la, tuning["chosen"])

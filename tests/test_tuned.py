"""The gradient-trained methods on the tiny model: contracts, equivalences, files, and the shared base."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import lmtune
from lmtune.data import Dataset, open_data
from lmtune.errors import LmtuneError
from lmtune.methods import METHODS, ZeroShotClassifier
from lmtune.methods.tuned import TunedClassifier

from _exactness import assert_same_values_and_gradients

TUNED = [name for name, cls in METHODS.items() if issubclass(cls, TunedClassifier)]


@pytest.fixture(scope="module")
def small():
    """A tiny learnable slice: 32 training reviews, 16 test reviews."""
    tr = open_data("builtin:reviews:train")
    te = open_data("builtin:reviews:test")
    return (Dataset(tr.records[:32], tr.lines[:32], tr.path), Dataset(te.records[:16], te.lines[:16], te.path))


def zero_shot_logits(lm, task, data):
    return ZeroShotClassifier(lm, task, progress=False, cache=False).fit().label_logits(data)[0]


def fitted(lm, task, data, method, **kw):
    kw = {"epochs": 1, "progress": False, "cache": False, "seed": 0, **kw}
    return METHODS[method](lm, task, **kw).fit(data)


@pytest.mark.parametrize("method", TUNED)
def test_every_method_lowers_training_loss_and_leaves_the_base_unchanged(tiny_lm, review_task, small, method):
    train, test = small
    before = zero_shot_logits(tiny_lm, review_task, test)
    weights = {n: p.detach().clone() for n, p in tiny_lm.model.named_parameters()}
    flags = {n: p.requires_grad for n, p in tiny_lm.model.named_parameters()}
    lr = {"full": 1e-3, "last-layers": 3e-3, "prompt-tuning": 0.05, "norm-tuning": 0.1}.get(method, 1e-2)
    kw = {"adalora": {"init_rank": 4, "target_rank": 2}}.get(method, {})
    est = fitted(tiny_lm, review_task, train, method, epochs=6, lr=lr, batch_size=8, schedule="constant", warmup=0,
                 **kw)
    losses = [h["train_loss"] for h in est.train_result_.history]
    # On a random model the last hidden state hardly depends on the input, so a prompt can learn little
    # beyond the label prior; every other method can fit the 32 examples.
    assert losses[-1] < losses[0] - (0.001 if method == "prompt-tuning" else 0.01), losses
    assert est.predict_proba(test).shape == (16, 2)
    for n, p in tiny_lm.model.named_parameters():
        assert torch.equal(p, weights[n]), f"{method} left {n} changed"
        assert p.requires_grad == flags[n]
    assert np.array_equal(zero_shot_logits(tiny_lm, review_task, test), before)
    info = est.fit_info_
    assert 0 < info["trainable_params"] <= info["base_params"] + 10**6
    assert info["train"]["steps"] == 6 * 4


@pytest.mark.parametrize("method", TUNED)
def test_saved_run_reloads_to_identical_predictions(tiny_lm, review_task, small, tmp_path, method):
    train, test = small
    kw = {"adalora": {"init_rank": 4, "target_rank": 2, "epochs": 3}}.get(method, {})
    est = fitted(tiny_lm, review_task, train, method, lr=1e-2 if method != "full" else 1e-4, **kw)
    p = est.predict_proba(test)
    est.save(tmp_path / "run")
    card = json.loads((tmp_path / "run" / "card.json").read_text())
    assert card["method"] == method and card["training"]["trainable_params"] == est.fit_info_["trainable_params"]
    again = lmtune.load_run(tmp_path / "run", model=tiny_lm, progress=False, cache=False)
    assert type(again) is type(est)
    np.testing.assert_array_equal(again.predict_proba(test), p)


def test_lora_equals_the_base_model_at_initialisation(tiny_lm, review_task, small):
    _, test = small
    est = METHODS["lora"](tiny_lm, review_task, progress=False, cache=False)
    torch.manual_seed(0)
    est._init_state(tiny_lm)
    enc = review_task.encode(tiny_lm.tokenizer, test)
    ids = torch.tensor(review_task.label_token_ids(tiny_lm.tokenizer))
    with est._attach(tiny_lm, train=True) as params:
        assert params and all("lora_" in n for n in params)
        logits = est._logits_of(tiny_lm, enc.input_ids, ids)
    np.testing.assert_allclose(logits, zero_shot_logits(tiny_lm, review_task, test), atol=1e-5)


def test_merged_lora_predicts_like_the_adapter(tiny_lm, review_task, small):
    from lmtune.merge import merged_lm

    train, test = small
    est = fitted(tiny_lm, review_task, train, "lora", lr=3e-2, epochs=2)
    adapted = est.label_logits(test)[0]
    assert np.abs(adapted - zero_shot_logits(tiny_lm, review_task, test)).max() > 1e-3  # training moved it
    merged = ZeroShotClassifier(merged_lm(est), review_task, progress=False, cache=False).fit()
    np.testing.assert_allclose(merged.label_logits(test)[0], adapted, atol=1e-4)


def test_adapter_loads_with_plain_peft(tiny_lm, tiny_model_dir, review_task, small, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    train, test = small
    est = fitted(tiny_lm, review_task, train, "lora", lr=3e-2, rank=4, target="q_proj,v_proj,o_proj")
    run = est.save(tmp_path / "run")
    assert (run / "adapter_config.json").is_file() and (run / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = PeftModel.from_pretrained(base, str(run)).eval()
    enc = review_task.encode(tiny_lm.tokenizer, test)
    ids = review_task.label_token_ids(tiny_lm.tokenizer)
    with torch.no_grad():
        plain = np.stack([peft_model(input_ids=torch.tensor([s])).logits[0, -1, ids].numpy() for s in enc.input_ids])
    np.testing.assert_allclose(plain, est.label_logits(test)[0], atol=1e-4)


def test_reusing_frozen_lower_layers_is_exact(tiny_lm, review_task, small):
    train, test = small
    for method, kw in (("lora", {"layers": 1, "dropout": 0.0}), ("last-layers", {"layers": 1}),
                       ("adapter", {"layers": "1"})):
        a = fitted(tiny_lm, review_task, train, method, lr=1e-2, epochs=2, **kw)
        # against the plain path: every row in full through every layer
        b = fitted(tiny_lm, review_task, train, method, lr=1e-2, epochs=2, reuse_lower=False, share_prefix=False,
                   **kw)
        assert a.fit_info_["reused_lower_layers"] == 1 and b.fit_info_["reused_lower_layers"] == 0
        np.testing.assert_allclose(a.label_logits(test)[0], b.label_logits(test)[0], atol=1e-4)


def test_lora_layers_option_adapts_only_those_layers(tiny_lm, review_task, small):
    est = fitted(tiny_lm, review_task, small[0], "lora", layers="1", max_steps=1)
    # rank 8 on layer 1 only: q_proj 32->32 (A 8x32, B 32x8) and v_proj 32->16 (A 8x32, B 16x8)
    assert est.fit_info_["trainable_params"] == (8 * 32 + 32 * 8) + (8 * 32 + 16 * 8)
    assert est.fit_info_["reused_lower_layers"] == 1


def test_pissa_keeps_the_base_and_its_saved_adapter_reproduces_training(tiny_lm, review_task, small, tmp_path):
    train, test = small
    weights = {n: p.detach().clone() for n, p in tiny_lm.model.named_parameters()}
    est = fitted(tiny_lm, review_task, train, "lora", init="pissa", rank=4, lr=1e-2, epochs=2)
    for n, p in tiny_lm.model.named_parameters():
        assert torch.equal(p, weights[n]), n
    cfg = json.loads((est.save(tmp_path / "run") / "adapter_config.json").read_text())
    assert cfg["r"] == 8  # converted to a plain LoRA of rank 2r against the original weights
    p = est.predict_proba(test)
    assert np.abs(p - softmax_rows(zero_shot_logits(tiny_lm, review_task, test))).max() > 1e-4


def softmax_rows(x):
    from lmtune.methods.base import softmax

    return softmax(x)


def test_adalora_allocates_ranks(tiny_lm, review_task, small):
    est = fitted(tiny_lm, review_task, small[0], "adalora", init_rank=6, target_rank=2, epochs=4, lr=1e-2)
    pattern = est.rank_pattern()
    assert pattern, "AdaLoRA saved no rank pattern: its allocator never ran"
    total = sum(pattern.values())
    assert total <= 2 * len(pattern) < 6 * len(pattern)


def test_adapter_switch_matches_each_run(tiny_lm, review_task, small, tmp_path):
    from lmtune.switch import AdapterSwitch
    from lmtune.tasks import ClassificationTask

    train, test = small
    a = fitted(tiny_lm, review_task, train, "lora", lr=3e-2, seed=1)
    other = ClassificationTask("Text: {text}\nIs it positive? Answer yes or no.", {"negative": "no", "positive": "yes"})
    b = fitted(tiny_lm, other, train, "lora", lr=3e-2, seed=2, rank=4)
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    with AdapterSwitch({"a": tmp_path / "a", "b": tmp_path / "b"}, model=tiny_lm, progress=False, cache=False) as sw:
        pa, pb, pa2 = sw.predict_proba(test, "a"), sw.predict_proba(test, "b"), sw.predict_proba(test, "a")
        with pytest.raises(LmtuneError, match="no adapter named"):
            sw.predict_proba(test, "c")
    np.testing.assert_allclose(pa, a.predict_proba(test), atol=1e-6)
    np.testing.assert_allclose(pb, b.predict_proba(test), atol=1e-6)
    np.testing.assert_array_equal(pa, pa2)
    assert np.abs(pa - pb).max() > 1e-4


def test_unfitted_and_bad_options_fail_clearly(tiny_lm, review_task, small):
    with pytest.raises(LmtuneError, match="not fitted"):
        METHODS["lora"](tiny_lm, review_task).predict_proba(small[1])
    with pytest.raises(LmtuneError, match="rank"):
        fitted(tiny_lm, review_task, small[0], "lora", rank=0)
    with pytest.raises(LmtuneError, match="layers"):
        fitted(tiny_lm, review_task, small[0], "last-layers", layers=5)
    with pytest.raises(LmtuneError, match="placement"):
        fitted(tiny_lm, review_task, small[0], "adapter", placement="middle")


def test_frozen_lower_layers_with_a_shared_prompt_prefix_are_exact(tiny_lm, small):
    """A long common instruction runs once through the frozen layers; the cached states equal a plain pass."""
    from lmtune.methods.tuned import layer_range, pad_batch
    from lmtune.tasks import ClassificationTask

    task = ClassificationTask("Is this review positive or not ? Answer yes or no . Review: {text}",
                              {"negative": "no", "positive": "yes"})
    train, test = small
    est = METHODS["last-layers"](tiny_lm, task, layers=1, progress=False, cache=False)
    seqs = task.encode(tiny_lm.tokenizer, train).input_ids[:6]
    cached = est._lower_cache(tiny_lm, seqs, 1)
    with torch.no_grad(), layer_range(tiny_lm, 0, 1, final_norm=False) as low:
        for s, h in zip(seqs, cached):
            ids, mask, _ = pad_batch([s], 0, tiny_lm.device)
            direct = low(input_ids=ids, attention_mask=mask).last_hidden_state[0]
            assert h.shape == direct.shape
            torch.testing.assert_close(h.to(direct.device), direct, atol=1e-5, rtol=1e-5)  # the cache is kept on the CPU
    # the top layer's pass shares the prefix as well (exact without dropout, which would draw other masks)
    a = fitted(tiny_lm, task, train, "lora", layers=1, lr=1e-2, epochs=2, dropout=0.0)
    b = fitted(tiny_lm, task, train, "lora", layers=1, lr=1e-2, epochs=2, dropout=0.0, reuse_lower=False,
               share_prefix=False)
    np.testing.assert_allclose(a.label_logits(test)[0], b.label_logits(test)[0], atol=1e-4)


def test_gradient_checkpointing_gives_the_same_training(tiny_lm, review_task, small):
    train, test = small
    a = fitted(tiny_lm, review_task, train, "lora", lr=1e-2, epochs=2, dropout=0.0)
    b = fitted(tiny_lm, review_task, train, "lora", lr=1e-2, epochs=2, dropout=0.0, gradient_checkpointing=True)
    np.testing.assert_allclose(a.label_logits(test)[0], b.label_logits(test)[0], atol=1e-5)
    assert not getattr(tiny_lm.model, "is_activation_checkpointing", False)  # switched off again


@pytest.mark.parametrize("method, kw", [("lora", {"dropout": 0.0}), ("prompt-tuning", {"virtual_tokens": 3}),
                                        ("adapter", {}), ("full", {})])
def test_shared_prompt_prefix_is_exact_in_value_and_gradient(tiny_lm, small, method, kw):
    from lmtune.features import common_prefix_length
    from lmtune.tasks import ClassificationTask

    task = ClassificationTask("Read the product review below and judge its sentiment carefully.\n"
                              "Review: {text}\nIs this review positive? Answer yes or no.",
                              {"negative": "no", "positive": "yes"})
    est = fitted(tiny_lm, task, small[0], method, lr=1e-2, max_steps=2, **kw)  # trained: B is no longer zero
    seqs = task.encode(tiny_lm.tokenizer, small[0]).input_ids[:6]
    assert common_prefix_length(seqs) >= 10
    label_ids = torch.tensor(task.label_token_ids(tiny_lm.tokenizer))
    assert_same_values_and_gradients(est, tiny_lm, lambda: est._forward(tiny_lm, seqs, label_ids, share_prefix=True),
                                     lambda: est._forward(tiny_lm, seqs, label_ids, share_prefix=False))


def test_fast_dropout_has_dropouts_distribution_and_gradient():
    from lmtune.methods.peft_methods import FastDropout

    torch.manual_seed(0)
    x = torch.randn(200, 500, dtype=torch.float64, requires_grad=True)
    d = FastDropout(0.2).train()
    y = d(x)
    kept = y != 0
    assert abs(kept.double().mean().item() - 0.8) < 0.005  # 100,000 draws: 4 standard errors
    torch.testing.assert_close(y[kept], x[kept] / 0.8)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, kept.double() / 0.8)
    assert d.eval()(x) is x and FastDropout(0.0).train()(x) is x


def test_lora_trains_with_fast_dropout_on_the_cpu_and_leaves_none_behind(tiny_lm, review_task, small):
    from lmtune.methods.peft_methods import FastDropout

    if tiny_lm.device.type != "cpu":
        pytest.skip("the swap is CPU-only")
    est = METHODS["lora"](tiny_lm, review_task, epochs=1, progress=False, cache=False, dropout=0.1)
    seen = []
    est._after_update = lambda step, lr: seen.append(
        sum(isinstance(m, FastDropout) for m in tiny_lm.model.modules()))
    est.fit(small[0])
    assert seen and all(n > 0 for n in seen)  # q_proj and v_proj of every layer
    assert not any(isinstance(m, FastDropout) for m in tiny_lm.model.modules())


def test_shared_prompt_prefix_under_activation_checkpointing_is_exact(tiny_lm, small):
    from lmtune.methods.tuned import _checkpointing
    from lmtune.tasks import ClassificationTask

    task = ClassificationTask("Read the product review below and judge its sentiment carefully.\n"
                              "Review: {text}\nIs this review positive? Answer yes or no.",
                              {"negative": "no", "positive": "yes"})
    est = fitted(tiny_lm, task, small[0], "lora", lr=1e-2, max_steps=2, dropout=0.0)
    seqs = task.encode(tiny_lm.tokenizer, small[0]).input_ids[:6]
    label_ids = torch.tensor(task.label_token_ids(tiny_lm.tokenizer))

    def run(share, checkpoint):
        _checkpointing(tiny_lm.model, checkpoint)
        return est._forward(tiny_lm, seqs, label_ids, share_prefix=share)

    try:
        assert_same_values_and_gradients(est, tiny_lm, lambda: run(False, False), lambda: run(True, True))
    finally:
        _checkpointing(tiny_lm.model, False)
    assert not any(hasattr(layer, "_can_checkpoint_with_cache") and "_can_checkpoint_with_cache" in vars(layer)
                   for layer in tiny_lm.model.model.layers)

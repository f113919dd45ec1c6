"""End to end with the real default model: instruction tuning on the built-in dataset, and forgetting.

Full fine-tuning against LoRA on the held text is measured, not asserted here: at the default learning
rates it did not come out as the issue expected (see the issue notes and docs/benchmarks.md).

One shared load of the model (``real_lm``); one LoRA run serves every test of the module.
"""

import pytest

import lmtune
from lmtune.data import open_data
from lmtune.forgetting import forgetting
from lmtune.gen_eval import evaluate_generation
from lmtune.instruct import GenerationTask

pytestmark = pytest.mark.real_model

# LoRA on the top 8 blocks (the 22 frozen blocks run once): about a minute of training on 2 cores.
LORA = {"rank": 8, "alpha": 16, "target": "q_proj,v_proj", "layers": 8, "lr": 1e-2, "epochs": 2, "batch_size": 8}
HELD = [{"name": "held-text", "type": "lm", "data": "builtin:heldtext"}]


@pytest.fixture(scope="module")
def lora(real_lm):
    return lmtune.LoraClassifier(real_lm, GenerationTask(), progress=False, **LORA).fit("builtin:instruct:train")


def test_lora_instruction_tuning_raises_rouge_l(lora):
    test = open_data("builtin:instruct:test")
    test = test.subset(range(0, len(test), 2))  # 30 records, 6 of each task
    ev = evaluate_generation(lora, test, metrics=("rouge", "exact"), max_new_tokens=16)
    tuned, base = ev["metrics"]["rouge"]["rougeL"]["f1"], ev["base"]["rouge"]["rougeL"]["f1"]
    assert tuned >= base + 0.2, (base, tuned, ev["examples"])
    assert ev["metrics"]["exact"]["rate"] > ev["base"]["exact"]["rate"]
    # the learned end-of-turn token stops the answers: most end by EOS, not by the length limit
    assert ev["generation"]["finish_reasons"]["eos"] >= 0.8 * len(test)


def test_per_task_losses_are_reported(lora):
    per_task = lora.fit_info_["per_task_train_loss"]
    assert set(per_task) == {"numbers", "sort", "extract", "summary", "plural"}
    assert all(v >= 0 for v in per_task.values())


def test_forgetting_report_of_the_lora_run_on_held_text(real_lm, lora):
    """The held-text loss with and without the adapter, against a direct computation of both."""
    from lmtune.lm_loss import sequence_losses

    res = forgetting(lora, HELD)["tasks"]["held-text"]
    seqs = GenerationTask().encode(real_lm.tokenizer, open_data("builtin:heldtext"))
    n = [s.n_targets - 1 for s in seqs]  # token-weighted mean over every predicted token
    base = sum(loss * k for loss, k in zip(sequence_losses(real_lm, seqs), n)) / sum(n)
    with lora.attached():
        adapted = sum(loss * k for loss, k in zip(sequence_losses(real_lm, seqs), n)) / sum(n)
    assert res["base"]["loss"] == pytest.approx(base, rel=1e-5)
    assert res["delta"]["loss"] == pytest.approx(adapted - base, abs=1e-5)
    assert res["delta"]["loss"] != 0

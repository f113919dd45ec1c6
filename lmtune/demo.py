"""The main job on the embedded defaults: zero-shot, closed-form and LoRA on the built-in reviews dataset,
then LoRA instruction tuning on the built-in instruction dataset (answers scored against the base model's).

``make demo`` runs this through ``lmtune demo``. Everything it prints is measured in the run.
"""

from __future__ import annotations

import time

from lmtune.evaluate import evaluate
from lmtune.methods import ClosedFormClassifier, LoraClassifier, ZeroShotClassifier
from lmtune.models import DEFAULT_MODEL, as_lm
from lmtune.tasks import ClassificationTask

DEMO_TEMPLATE = "Review: {text}\nIs this review positive? Answer yes or no."
DEMO_LABEL_WORDS = {"negative": "no", "positive": "yes"}
DEMO_TRAIN = "builtin:reviews:train"
DEMO_TEST = "builtin:reviews:test"
# LoRA on the top 4 blocks: the 26 frozen blocks run once, so three epochs take minutes on a laptop CPU.
# Instruction tuning: LoRA on the top 8 blocks, 2 epochs over the 180 training instructions.
DEMO_INSTRUCT_TRAIN = "builtin:instruct:train"
DEMO_INSTRUCT_TEST = "builtin:instruct:test"
DEMO_GEN_LORA = {"rank": 8, "alpha": 16, "target": "q_proj,v_proj", "layers": 8, "lr": 1e-2, "epochs": 2,
                 "batch_size": 8}
DEMO_LORA = {"rank": 8, "alpha": 16, "target": "q_proj,v_proj", "layers": 4, "lr": 1e-2, "epochs": 3, "batch_size": 8}


def demo_task() -> ClassificationTask:
    return ClassificationTask(DEMO_TEMPLATE, DEMO_LABEL_WORDS)


def run_demo(model=DEFAULT_MODEL, *, progress: bool | None = None, out: str | None = None, log=print,
             lora: bool = True, generate: bool = True) -> dict:
    """Score the test split zero-shot, fit the closed-form head (and LoRA) on the train split, evaluate.

    Returns
    -------
    dict
        ``{"model", "load_seconds", "rows": [per-method summary], "zero_shot": eval, "closed_form": eval,
        "lora": eval or None, "instruct": generation eval or None}``.
    """
    t0 = time.perf_counter()
    log(f"loading {model} ...")
    lm = as_lm(model)
    load_s = time.perf_counter() - t0
    task = demo_task()

    zs = ZeroShotClassifier(lm, task, progress=progress).fit()
    log("scoring the test split zero-shot ...")
    zs_eval = evaluate(zs, DEMO_TEST)

    log("fitting the closed-form head on the train split ...")
    t1 = time.perf_counter()
    cf = ClosedFormClassifier(lm, task, progress=progress).fit(DEMO_TRAIN)
    fit_s = time.perf_counter() - t1
    cf_eval = evaluate(cf, DEMO_TEST)
    if out:
        cf.save(out)

    def row(name, ev, fit_seconds, extra=""):
        m = ev["metrics"]
        return {"method": name, "accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "nll": m["nll"],
                "ece": m["ece"], "fit_seconds": fit_seconds, "note": extra}

    rows = [row("zero-shot", zs_eval, 0.0),
            row("closed-form", cf_eval, fit_s,
                f"lambda={cf.lam_:.3g} ({cf.solution_.selection.criterion if cf.solution_.selection else 'given'}), "
                f"solve {cf.solve_seconds_ * 1e3:.1f} ms, cond {cf.solution_.condition_number:.2g}")]
    lora_eval = None
    if lora:
        log("training LoRA (r=8, q_proj/v_proj of the top 4 blocks, 3 epochs) on the train split ...")
        est = LoraClassifier(lm, task, progress=progress, **DEMO_LORA).fit(DEMO_TRAIN)
        info = est.fit_info_
        lora_eval = evaluate(est, DEMO_TEST)
        rows.append(row("lora", lora_eval, info["train_seconds"],
                        f"{info['trainable_params']:,} trainable parameters ({100 * info['trainable_share']:.2f}%), "
                        f"{info['train']['steps']} steps"))
    gen_eval = None
    if generate:
        from lmtune.gen_eval import evaluate_generation
        from lmtune.instruct import GenerationTask

        log("instruction tuning: LoRA (r=8, q_proj/v_proj of the top 8 blocks, 2 epochs) on "
            f"{DEMO_INSTRUCT_TRAIN} ...")
        est = LoraClassifier(lm, GenerationTask(), progress=progress, **DEMO_GEN_LORA).fit(DEMO_INSTRUCT_TRAIN)
        log(f"answering {DEMO_INSTRUCT_TEST} with the tuned and the base model ...")
        gen_eval = evaluate_generation(est, DEMO_INSTRUCT_TEST, metrics=("rouge", "bleu", "exact"),
                                       max_new_tokens=24, n_examples=5)
        gen_eval["train_seconds"] = est.fit_info_["train_seconds"]
        gen_eval["per_task_train_loss"] = est.fit_info_["per_task_train_loss"]
    return {"model": lm.name, "load_seconds": load_s, "train": DEMO_TRAIN, "test": DEMO_TEST,
            "template": DEMO_TEMPLATE, "n_train": cf.n_train_, "rows": rows, "zero_shot": zs_eval, "closed_form": cf_eval,
            "lora": lora_eval, "instruct": gen_eval}

"""Catastrophic forgetting: score the base model and an adapted run on other tasks, and report the deltas.

A *suite* file (YAML or JSON) names the tasks to watch::

    tasks:
      - name: reviews                 # label-token classification, zero-shot on the (adapted) model
        type: classification
        data: builtin:reviews:test
        template: "Review: {text}\\nIs this review positive? Answer yes or no."
        label_words: "negative=no,positive=yes"
      - name: instructions            # generation, scored by ROUGE/BLEU/exact match
        type: generation
        data: builtin:instruct:test
        metrics: [rouge, exact]
        max_new_tokens: 32
      - name: mcqa                    # multiple choice, log-likelihood of each choice
        type: multiple-choice
        data: builtin:mcqa:test
        k_shot: 0
      - name: held-text               # language-modelling loss on a held text (token-weighted NLL)
        type: lm
        data: builtin:heldtext

Relative data paths are read relative to the suite file. ``limit: N`` scores the first N records only.
``--suite builtin`` is the suite above, shipped with lmtune (``lmtune/datasets/forgetting.yaml``).

Every task is scored twice on one loaded model: as it is (the base), and with the run's learned state
attached (:meth:`attached` of the estimator). A run that does not change the model (zero-shot,
closed-form: the correction lives outside the network) has deltas of exactly zero on other tasks, and the
report says so rather than spending the time. Higher is better for every metric but the LM loss (and its
perplexity); each delta is ``adapted - base``, and ``worse`` says in which direction a delta hurts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from lmtune.errors import LmtuneError

TASK_TYPES = ("classification", "generation", "multiple-choice", "lm")
SUITE_KEYS = {"name", "type", "data", "limit", "template", "label_words", "label_field", "chat", "max_length",
              "metrics", "max_new_tokens", "k_shot", "dev", "stem", "system"}


def read_suite(path) -> list[dict]:
    """The suite's task entries, validated, with data paths resolved against the suite's folder."""
    import yaml

    if str(path) == "builtin":
        from importlib import resources

        with resources.as_file(resources.files("lmtune.datasets") / "forgetting.yaml") as f:
            return read_suite(f)
    p = Path(path)
    if not p.is_file():
        raise LmtuneError(f"{p}: suite file not found")
    try:
        doc = yaml.safe_load(p.read_text(encoding="utf-8")) if p.suffix.lower() in (".yaml", ".yml") else \
            json.loads(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise LmtuneError(f"{p}: not valid {'YAML' if p.suffix.lower() in ('.yaml', '.yml') else 'JSON'}: {e}") from None
    tasks = doc.get("tasks") if isinstance(doc, dict) else None
    if not isinstance(tasks, list) or not tasks:
        raise LmtuneError(f"{p}: expected a top-level 'tasks' list")
    out, names = [], set()
    for i, t in enumerate(tasks):
        where = f"{p}: tasks[{i}]"
        if not isinstance(t, dict):
            raise LmtuneError(f"{where}: expected a mapping with name, type and data")
        unknown = set(t) - SUITE_KEYS
        if unknown:
            raise LmtuneError(f"{where}: unknown key(s) {sorted(unknown)}; expected some of {sorted(SUITE_KEYS)}")
        for key in ("name", "type", "data"):
            if not isinstance(t.get(key), str) or not t[key].strip():
                raise LmtuneError(f"{where}.{key}: expected a non-empty string")
        if t["type"] not in TASK_TYPES:
            raise LmtuneError(f"{where}.type: expected one of {list(TASK_TYPES)}, got {t['type']!r}")
        if t["name"] in names:
            raise LmtuneError(f"{where}.name: {t['name']!r} is used twice")
        if t["type"] == "classification" and not (t.get("template") and t.get("label_words")):
            raise LmtuneError(f"{where}: a classification task needs template and label_words")
        names.add(t["name"])
        t = dict(t)
        for key in ("data", "dev"):
            if t.get(key) and not t[key].startswith("builtin:") and not Path(t[key]).is_absolute():
                t[key] = str((p.parent / t[key]).resolve())
        out.append(t)
    return out


def _limited(data, limit):
    from lmtune.data import open_data

    ds = open_data(data)
    return ds.subset(range(min(int(limit), len(ds)))) if limit else ds


def _score_classification(lm, spec) -> dict:
    from lmtune.features import extract
    from lmtune.methods.base import softmax
    from lmtune.metrics import classification_report
    from lmtune.tasks import ClassificationTask

    task = ClassificationTask(spec["template"], spec["label_words"], label_field=spec.get("label_field", "label"),
                              chat=spec.get("chat", True), max_length=spec.get("max_length", 512))
    ds = _limited(spec["data"], spec.get("limit"))
    enc = task.encode(lm.tokenizer, ds, labeled=True)
    # Never the on-disk feature cache: it is keyed by the base model, and adapters may be attached.
    L = extract(lm, enc.input_ids, task.label_token_ids(lm.tokenizer), progress=False).L
    rep = classification_report(enc.y, softmax(L), task.labels)
    return {"accuracy": rep["accuracy"], "macro_f1": rep["macro_f1"], "nll": rep["nll"], "n": len(ds)}


def _score_generation(lm, spec, prefix=None) -> dict:
    from lmtune.gen_eval import generate_and_score
    from lmtune.instruct import GenerationTask

    task = GenerationTask(chat=spec.get("chat", True), system=spec.get("system"), template=spec.get("template"),
                          max_length=spec.get("max_length", 1024))
    ds = _limited(spec["data"], spec.get("limit"))
    rep = generate_and_score(lm, task, ds, metrics=spec.get("metrics", ("rouge", "exact")),
                             max_new_tokens=spec.get("max_new_tokens", 64), stem=spec.get("stem", True),
                             prefix=prefix)
    return {**flat_scores(rep["scores"]), "n": len(ds)}


def flat_scores(report: dict) -> dict:
    """One number per generation metric: ROUGE F1s, BLEU (0-100), exact-match rate."""
    out = {}
    for name, v in report.get("rouge", {}).items():
        if isinstance(v, dict):  # rouge1/rouge2/rougeL; the other entries describe the settings
            out[name] = v["f1"]
    if "bleu" in report:
        out["bleu"] = report["bleu"]["score"]
    if "exact" in report:
        out["exact"] = report["exact"]["rate"]
    return out


def _score_multiple_choice(lm, spec) -> dict:
    from lmtune.multiple_choice import evaluate_multiple_choice

    # The model as it is now (adapter attached or not); ``limit`` counts questions per subject here.
    rep = evaluate_multiple_choice(spec["data"], model=lm, dev=spec.get("dev"), k_shot=spec.get("k_shot", 0),
                                   limit=spec.get("limit"))
    overall = rep["overall"]
    return {"acc": overall["acc"], "acc_norm": overall["acc_norm"], "n": overall["n"]}


def _score_lm(lm, spec, prefix=None) -> dict:
    from lmtune.instruct import GenerationTask
    from lmtune.lm_loss import sequence_losses

    ds = _limited(spec["data"], spec.get("limit"))
    if not all("text" in r for r in ds.records):
        raise LmtuneError(f"{spec['name']}: an lm task reads records with a 'text' field")
    seqs = GenerationTask(max_length=spec.get("max_length", 1024)).encode(lm.tokenizer, ds)
    per_seq = sequence_losses(lm, seqs, prefix=prefix)
    n_tok = np.array([s.n_targets - (1 if s.targets[0] else 0) for s in seqs], dtype=np.float64)
    nll = float((per_seq * n_tok).sum() / n_tok.sum())  # token-weighted: the text's loss, as perplexity uses
    return {"loss": nll, "perplexity": math.exp(nll), "tokens": int(n_tok.sum()), "n": len(ds)}


SCORERS = {"classification": _score_classification, "generation": _score_generation,
           "multiple-choice": _score_multiple_choice, "lm": _score_lm}
LOWER_IS_BETTER = {"loss", "perplexity", "nll"}


def changes_model(est) -> bool:
    """Whether a run's learned state lives inside the network (so other tasks can be affected)."""
    from lmtune.methods.tuned import TunedClassifier

    return isinstance(est, TunedClassifier)


def _score(lm, spec, est=None) -> dict:
    """One task's scores on ``lm`` as it is; ``est`` supplies virtual tokens (prompt tuning) if it has them."""
    prefix = getattr(est, "_virtual_prefix", None)
    virtual = prefix is not None and prefix(1) is not None
    if spec["type"] in ("classification", "multiple-choice"):
        if virtual:
            raise LmtuneError(f"{spec['name']}: {spec['type']} tasks are not scored with a prompt-tuning run's "
                              "virtual tokens; leave the task out of the suite")
        return SCORERS[spec["type"]](lm, spec)
    return SCORERS[spec["type"]](lm, spec, prefix=prefix if virtual else None)


def forgetting(est, suite, *, base_scores: dict | None = None) -> dict:
    """Base and adapted scores on every suite task, with the deltas.

    Parameters
    ----------
    est : a fitted estimator (see :func:`lmtune.load_run`)
    suite : str, Path or list of dict
        A suite file or its parsed task list.
    base_scores : dict, optional
        The base model's scores from an earlier call (``result["tasks"][name]["base"]``), reused.

    Returns
    -------
    dict
        ``{"run": ..., "model": ..., "tasks": {name: {"type", "base", "adapted", "delta", "worse"}}}``.
    """
    tasks = suite if isinstance(suite, list) else read_suite(suite)
    lm = est.lm
    out = {"method": est.method, "model": lm.name, "changes_model": changes_model(est), "tasks": {}}
    for spec in tasks:
        base = (base_scores or {}).get(spec["name"]) or _score(lm, spec)
        if changes_model(est):
            with est.attached():
                adapted = _score(lm, spec, est)
        else:
            adapted = dict(base)
        delta = {k: adapted[k] - base[k] for k in base if k != "n" and isinstance(base[k], (int, float))
                 and k != "tokens"}
        out["tasks"][spec["name"]] = {"type": spec["type"], "base": base, "adapted": adapted, "delta": delta,
                                      "worse": {k: ("up" if k in LOWER_IS_BETTER else "down") for k in delta}}
    return out


def headline(result: dict) -> dict:
    """One number per task for tables: the change of its main metric (adapted - base)."""
    main = {"classification": "accuracy", "generation": "rougeL", "multiple-choice": "acc", "lm": "loss"}
    out = {}
    for name, t in result["tasks"].items():
        key = main[t["type"]]
        if key in t["delta"]:
            out[name] = {"metric": key, "delta": t["delta"][key]}
    return out


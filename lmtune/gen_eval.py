"""Generation runs end to end: answer records with a run (or the base model) and score the answers.

The pieces live elsewhere -- prompts from :class:`lmtune.instruct.GenerationTask`, decoding in
:mod:`lmtune.generation`, ROUGE/BLEU/exact match in :mod:`lmtune.genmetrics` -- and this module joins them
for ``lmtune generate`` and ``lmtune eval`` on a generation run. An evaluation scores the adapted model
and, unless asked not to, the base model on the same prompts with the same decoding settings, so the
gain of the adaptation is measured, not assumed.
"""

from __future__ import annotations

import time

from lmtune.errors import LmtuneError
from lmtune.metrics import to_jsonable

DEFAULT_METRICS = ("rouge", "bleu", "exact")


def _prefix(est):
    """The estimator's virtual-token function when it has one (prompt tuning), else None."""
    return getattr(est, "_virtual_prefix", None)


def _check(est):
    from lmtune.instruct import GenerationTask

    if not isinstance(est.task, GenerationTask):
        raise LmtuneError(f"this {est.method} run is a classification run: use lmtune predict / eval without "
                          "generation options")
    return est.task


def answer(lm, task, ds, *, prefix=None, **options) -> tuple[list, list]:
    """Generated answers (:class:`lmtune.generation.Generation`, input order) and the prompts."""
    from lmtune.generation import generate

    prompts = task.prompts(lm.tokenizer, ds)
    return generate(lm, prompts, prefix_embeds=prefix, **options), prompts


def generate_and_score(lm, task, ds, *, metrics=DEFAULT_METRICS, stem: bool = True, prefix=None,
                       **options) -> dict:
    """Answer every record of ``ds`` with ``lm`` as it is now and score against its references."""
    from lmtune.genmetrics import generation_report

    t0 = time.perf_counter()
    outs, prompts = answer(lm, task, ds, prefix=prefix, **options)
    seconds = time.perf_counter() - t0
    refs = [p.references for p in prompts]
    missing = [ds.lines[i] for i, r in enumerate(refs) if not r]
    if missing:
        raise LmtuneError(f"{ds.path}: records without a reference answer (lines {missing[:5]}"
                          f"{' ...' if len(missing) > 5 else ''}) cannot be scored; use lmtune generate for them")
    report = generation_report([o.text for o in outs], refs, metrics=tuple(metrics), stem=stem)
    new_tokens = sum(o.new_tokens for o in outs)
    return {"scores": report, "outputs": outs, "seconds": seconds, "new_tokens": new_tokens,
            "finish_reasons": {r: sum(o.finish_reason == r for o in outs) for r in ("eos", "stop", "length")}}


def evaluate_generation(est, data, *, metrics=DEFAULT_METRICS, stem: bool = True, base: bool = True,
                        n_examples: int = 5, **options) -> dict:
    """Metrics of a generation run on ``data`` (records with references), beside the base model's.

    Returns
    -------
    dict
        ``{"method", "model", "data", "generation", "metrics", "base"?, "examples"}``; ``metrics`` as
        :func:`lmtune.genmetrics.generation_report` returns them.
    """
    from lmtune.methods.base import as_dataset

    task = _check(est)
    ds = as_dataset(data)
    lm = est.lm
    with est.attached():
        adapted = generate_and_score(lm, task, ds, metrics=metrics, stem=stem, prefix=_prefix(est), **options)
    out = {"method": est.method, "model": lm.name,
           "data": {"path": ds.path, "n": len(ds), "sha256": ds.content_hash()},
           "generation": {**options, "seconds": adapted["seconds"], "new_tokens": adapted["new_tokens"],
                          "finish_reasons": adapted["finish_reasons"]},
           "metrics": adapted["scores"]}
    base_out = None
    if base and est.method != "zero-shot":
        base_run = generate_and_score(lm, task, ds, metrics=metrics, stem=stem, **options)
        out["base"] = base_run["scores"]
        base_out = base_run["outputs"]
    refs = task.prompts(lm.tokenizer, ds.subset(range(min(n_examples, len(ds)))))
    out["examples"] = [{"line": ds.lines[i], "reference": refs[i].references[0], "answer": adapted["outputs"][i].text,
                        **({"base_answer": base_out[i].text} if base_out else {})} for i in range(len(refs))]
    return to_jsonable(out)


def _row_meta(ds) -> tuple[list, list[dict]]:
    """Each record's id (its ``id`` field, else its line) and the fields every output line carries."""
    ids = [r.get("id", line) for r, line in zip(ds.records, ds.lines)]
    return ids, [{"line": line} for line in ds.lines]


def generate_rows(est, data, **options):
    """One JSON-able row per record, in the order answers finish (the same fields as :func:`generate_file`'s
    lines): id, index, line, text, finish reason, token counts and ids."""
    from lmtune.generation import iter_generate
    from lmtune.methods.base import as_dataset

    task = _check(est)
    ds = as_dataset(data)
    ids, extra = _row_meta(ds)
    prompts = task.prompts(est.lm.tokenizer, ds)
    with est.attached():
        for g in iter_generate(est.lm, prompts, prefix_embeds=_prefix(est), **options):
            yield {"id": ids[g.index], "index": g.index, **extra[g.index], **g.to_dict()}


def generate_file(est, data, out, *, resume: bool = False, progress: bool | None = None, **options) -> dict:
    """Answer every record into the JSONL file ``out`` through :func:`lmtune.generation.generate_jsonl`
    (a partial file flushed line by line, the final file in input order, renamed into place).

    A partial file left by an interrupted run is continued with ``resume`` and is otherwise an error:
    starting over silently would throw away the answers it holds.
    """
    from lmtune.generation import generate_jsonl, partial_path
    from lmtune.methods.base import as_dataset

    task = _check(est)
    ds = as_dataset(data)
    if partial_path(out).exists() and not resume:
        raise LmtuneError(f"{partial_path(out)} is left from an interrupted run: pass --resume to continue it, "
                          "or delete it")
    ids, extra = _row_meta(ds)
    prompts = task.prompts(est.lm.tokenizer, ds)
    with est.attached():
        return generate_jsonl(est.lm, prompts, out, ids=ids, extra=extra, resume=resume,
                              prefix_embeds=_prefix(est), progress=progress, **options)

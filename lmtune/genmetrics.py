"""Metrics of generated text against references: ROUGE-1/2/L, corpus BLEU, exact match.

The scores come from the packages the field reports them with, so a number here is the number a paper
would print: ROUGE from Google's ``rouge-score`` (the reimplementation of ROUGE-1.5.5 most papers now
use) and BLEU from ``sacrebleu``, whose signature string records every setting that changes the score.
Only what neither package offers is written here: the multi-reference bookkeeping, the exact-match
normalisation, and averaging into one JSON-able report.

Choices
-------
* **ROUGE** is the mean over records of each record's precision, recall and F1. ``rouge-score``
  lowercases and keeps only ``[a-z0-9]`` runs as tokens (so text in other scripts scores 0; this is the
  package's documented behaviour, kept for comparability). Stemming (Porter, ``use_stemmer``) is **on by
  default**, as in most summarisation papers and in ``rouge-score``'s own examples; ``stem=False`` turns
  it off. ROUGE-L is the whole-text LCS variant (``rougeL``), not the sentence-split ``rougeLsum``.
* **Several references** per record. ROUGE: each type takes the reference with the best F1 for that
  record (``RougeScorer.score_multi``, the usual convention; the best reference may differ between
  ROUGE-1 and ROUGE-L). BLEU: sacrebleu's reference streams, one stream per reference position; records
  with fewer references are padded with ``None``, which sacrebleu drops. Padding with ``""`` would be
  wrong: an empty reference takes part in the closest-reference-length rule of the brevity penalty.
  Exact match: a record matches when it equals any of its references.
* **BLEU** is corpus-level (sums of n-gram matches over all records, not a mean of sentence BLEUs),
  on sacrebleu's 0-100 scale with its defaults (13a tokenisation, ``exp`` smoothing, case sensitive,
  4-grams); its n-gram precisions are percentages, as sacrebleu reports them.
* **Exact match** compares after stripping and collapsing every run of whitespace to one space;
  ``ignore_case=True`` also case-folds (``str.casefold``). No punctuation or article removal (SQuAD's
  normalisation): those suit extractive QA, not instruction following, and would hide real errors.
"""

from __future__ import annotations

from collections.abc import Sequence

from lmtune.errors import DataError, LmtuneError

METRICS = ("rouge", "bleu", "exact")
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def normalize_text(text: str, ignore_case: bool = False) -> str:
    """Strip, collapse whitespace runs to one space, and case-fold when ``ignore_case``."""
    out = " ".join(text.split())
    return out.casefold() if ignore_case else out


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of two token sequences (dynamic programming, O(|a| |b|)).

    ROUGE-L is ``P = LCS / |prediction|``, ``R = LCS / |reference|``, ``F = 2PR / (P + R)``; this is the
    hand-written check the tests hold ``rouge-score`` to.
    """
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _check_inputs(predictions, references) -> list[list[str]]:
    """References as one list per record; every problem named by its record number (1-based)."""
    if isinstance(predictions, str) or not isinstance(predictions, Sequence):
        raise LmtuneError(f"predictions must be a list of strings, got {type(predictions).__name__}")
    if isinstance(references, str) or not isinstance(references, Sequence):
        raise LmtuneError(f"references must be a list (a string or a list of strings per record), "
                          f"got {type(references).__name__}")
    if len(predictions) != len(references):
        raise LmtuneError(f"{len(predictions)} predictions but {len(references)} references: "
                          "give one reference entry per prediction")
    if not predictions:
        raise LmtuneError("no predictions to score")
    refs = []
    for i, (p, r) in enumerate(zip(predictions, references)):
        if not isinstance(p, str):
            raise DataError(f"expected a string, got {type(p).__name__}", "<predictions>", i + 1)
        rs = [r] if isinstance(r, str) else r
        if not isinstance(rs, Sequence) or not rs:
            raise DataError("expected a reference string or a non-empty list of them", "<references>", i + 1)
        for x in rs:
            if not isinstance(x, str):
                raise DataError(f"expected reference strings, got {type(x).__name__}", "<references>", i + 1)
        if not any(x.strip() for x in rs):
            raise DataError("empty references: at least one reference must have text", "<references>", i + 1)
        refs.append(list(rs))
    return refs


def rouge_scores(predictions: list[str], references: list[list[str]], stem: bool = True) -> tuple[dict, list]:
    """Mean precision, recall and F1 of ROUGE-1, ROUGE-2 and ROUGE-L, and each record's F1s."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=stem)
    per = [scorer.score_multi(refs, pred) for pred, refs in zip(predictions, references)]
    n = len(per)
    out = {t: {"precision": sum(s[t].precision for s in per) / n, "recall": sum(s[t].recall for s in per) / n,
               "f1": sum(s[t].fmeasure for s in per) / n} for t in ROUGE_TYPES}
    out["stemmed"] = bool(stem)
    out["multi_reference"] = "best F1 over a record's references, per ROUGE type"
    return out, [{f"{t}_f1": s[t].fmeasure for t in ROUGE_TYPES} for s in per]


def bleu_score(predictions: list[str], references: list[list[str]]) -> dict:
    """Corpus BLEU (sacrebleu defaults), with its signature, n-gram precisions and brevity penalty."""
    from sacrebleu.metrics import BLEU

    width = max(len(r) for r in references)
    # One stream per reference position; None (dropped by sacrebleu) where a record has fewer references.
    streams = [[r[j] if j < len(r) else None for r in references] for j in range(width)]
    bleu = BLEU()
    res = bleu.corpus_score(predictions, streams)
    return {"score": float(res.score), "signature": str(bleu.get_signature()),
            "precisions": [float(p) for p in res.precisions], "brevity_penalty": float(res.bp),
            "sys_len": int(res.sys_len), "ref_len": int(res.ref_len), "counts": [int(c) for c in res.counts],
            "totals": [int(t) for t in res.totals]}


def exact_match(predictions: list[str], references: list[list[str]], ignore_case: bool = False) -> tuple[dict, list]:
    """Share of records equal (after :func:`normalize_text`) to any of their references."""
    hits = [any(normalize_text(p, ignore_case) == normalize_text(r, ignore_case) for r in refs)
            for p, refs in zip(predictions, references)]
    return ({"rate": sum(hits) / len(hits), "matches": int(sum(hits)), "ignore_case": bool(ignore_case),
             "normalization": "strip, collapse whitespace" + (", casefold" if ignore_case else "")}, hits)


def generation_report(predictions: list[str], references: "list[list[str]] | list[str]",
                      metrics: Sequence[str] = METRICS, stem: bool = True, ignore_case: bool = False,
                      per_record: bool = False) -> dict:
    """Score generated texts against one or several references each.

    Parameters
    ----------
    predictions : list of str
        N generated texts.
    references : list of str, or list of list of str
        One reference per record, or a non-empty list of references per record (counts may differ).
    metrics : sequence of str
        Any of ``"rouge"``, ``"bleu"``, ``"exact"``.
    stem : bool
        Porter-stem tokens before ROUGE matching (the usual setting; on by default).
    ignore_case : bool
        Exact match compares case-folded text.
    per_record : bool
        Also return each record's ROUGE F1s and exact-match outcome under ``"records"``.

    Returns
    -------
    dict
        JSON-able: ``n``; ``rouge`` (``rouge1``/``rouge2``/``rougeL`` each with mean ``precision``,
        ``recall``, ``f1`` in [0, 1]); ``bleu`` (``score`` 0-100, ``signature``, ``precisions``,
        ``brevity_penalty``, lengths); ``exact`` (``rate``, ``matches``); only the metrics asked for.

    Raises
    ------
    LmtuneError
        Unknown metric names, or predictions and references of different lengths.
    DataError
        A record with no reference text, or a value that is not a string (named by record number).
    """
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise LmtuneError(f"unknown metric{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: "
                          f"expected some of {', '.join(METRICS)}")
    if not metrics:
        raise LmtuneError(f"no metric asked for: expected some of {', '.join(METRICS)}")
    refs = _check_inputs(predictions, references)
    preds = list(predictions)
    out: dict = {"n": len(preds)}
    records = [{} for _ in preds]
    if "rouge" in metrics:
        out["rouge"], per = rouge_scores(preds, refs, stem=stem)
        for r, p in zip(records, per):
            r.update(p)
    if "bleu" in metrics:
        out["bleu"] = bleu_score(preds, refs)
    if "exact" in metrics:
        out["exact"], hits = exact_match(preds, refs, ignore_case=ignore_case)
        for r, h in zip(records, hits):
            r["exact"] = bool(h)
    if per_record:
        out["records"] = records
    return out

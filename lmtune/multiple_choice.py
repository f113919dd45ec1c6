"""MMLU-style multiple-choice benchmarks: read questions, score each choice by log-likelihood, report accuracy.

A question with choices ``c_1..c_K`` is answered by the choice whose continuation the model finds most
likely after the prompt ``x``::

    ll_k = sum_j log p(t_kj | x, t_k1 .. t_k(j-1))      t_k: the tokens of continuation k
    acc      = [argmax_k ll_k == gold]
    acc_norm = [argmax_k ll_k / len(c_k) == gold]      len in characters of the choice string

This follows lm-evaluation-harness (its ``multiple_choice`` output type and its MMLU task configs),
written here from its documented semantics; the deliberate differences are listed at the end.

Prompt formats
--------------
``letters`` (the harness's ``mmlu`` default)::

    The following are multiple choice questions (with answers) about {subject}.\\n\\n
    {shot question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: {letter}\\n\\n      (k times)
    {question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:

scored continuations ``" A"``, ``" B"``, ...; ``acc_norm`` equals ``acc`` here (every choice string has
one character). ``text`` (the harness's ``mmlu_continuation``): ``The following are questions (with
answers) about {subject}.\\n\\n`` and ``Question: {question}\\nAnswer:``, scored continuations
``" {choice text}"``; here the choices differ in length and ``acc_norm`` matters. ``{subject}`` is the
subject name with underscores as spaces. The k shots are the first k questions of the same subject in the
dev data, in file order (the harness's ``first_n`` sampler), the question itself excluded if present.

Tokenization (the harness's ``_encode_pair``): trailing whitespace of the context moves to the front of
the continuation; ``context + continuation`` and ``context`` are encoded separately (with the
tokenizer's default special tokens) and the continuation's tokens are those of the whole beyond the
context's length. The model reads ``context tokens + continuation tokens``. When that is longer than the
model's maximum length + 1, tokens are dropped from the left (per choice, as the harness does), and the
number of questions so truncated is reported.

Speed
-----
Every choice of a question shares its context, and every question of a subject shares the description
and the k shots, so the work is organised around the context, not the choice:

1. The token prefix common to a subject's contexts (description and shots: nearly all of a 5-shot
   prompt) runs once; its keys and values are broadcast to every batch of that subject (exact: causal
   attention; the same device as :mod:`lmtune.features`).
2. Each context's remainder runs once, in length-sorted batches. The final hidden state at its last
   token gives, through the output layer, the log-probabilities of *every* choice's first token. With
   the letter format (one-token continuations) that is the whole answer: one forward pass per question.
3. Continuations of more than one token run as a batch of (question, choice) rows on top of the
   context's key/value cache, their own tokens only.

Log-softmax over the vocabulary is computed only at the positions that predict continuation tokens,
never for the whole sequence. ``benchmarks/bench_multiple_choice.py`` compares this with one forward
pass per choice (identical choices and accuracies, and the speed-up).

Adapted models: a run folder is loaded with :func:`lmtune.load_run` and scored with its learned state
attached (LoRA, AdaLoRA, adapters, selective tuning); prompt tuning's virtual tokens are prepended to
every context (they lead the shared prefix). Runs that do not change the model (zero-shot, closed-form:
a head over one task's label logits) are refused: scoring them would silently score the base model.

Differences from lm-evaluation-harness: the ``--limit`` semantics match (the first N of each subject),
but lmtune reports both the micro average over all questions (the harness's MMLU group score,
``weight_by_size``) and the macro average over subjects; questions may have 2-26 choices (MMLU has 4);
no chat template is applied (the harness default).
"""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmtune.data import Dataset, open_data
from lmtune.errors import DataError, LmtuneError
from lmtune.features import MIN_SHARED_PREFIX, common_prefix_length
from lmtune.models import DEFAULT_MODEL, LM

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
FORMATS = ("letters", "text")
SPLIT_SUFFIXES = ("_test", "_dev", "_val", "_validation", "_train", "_auxiliary_train")
STEP2_CACHE_BYTES = 256 << 20  # key/value memory per batch of multi-token continuations


@dataclass
class Question:
    """One multiple-choice question.

    Attributes
    ----------
    question : str
    choices : list of str
    answer : int
        Index of the correct choice (0-based).
    subject : str
    where : tuple of (str, int)
        File and line it was read from.
    """

    question: str
    choices: list[str]
    answer: int
    subject: str
    where: tuple[str, int] = ("<memory>", 0)


# -- reading -------------------------------------------------------------------------------------------

def _answer_index(value, n_choices: int, where: tuple[str, int]) -> int:
    letters = LETTERS[:n_choices]
    expected = f"a letter {letters[0]}-{letters[-1]} or a 0-based index below {n_choices}"
    if isinstance(value, bool):
        raise DataError(f"expected {expected}, got {value!r}", where[0], where[1], "answer")
    if isinstance(value, int):
        if 0 <= value < n_choices:
            return value
        raise DataError(f"index {value} is out of range: expected {expected}", where[0], where[1], "answer")
    if isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in letters:
        return letters.index(value.strip().upper())
    raise DataError(f"expected {expected}, got {value!r}", where[0], where[1], "answer")


def _text_field(value, name: str, where: tuple[str, int]) -> str:
    if not isinstance(value, str) or not value.strip():
        got = "nothing" if value is None else repr(value)
        raise DataError(f"expected a non-empty string, got {got}", where[0], where[1], name)
    return value


def questions_from_records(ds: Dataset, subject: str | None = None) -> list[Question]:
    """Questions from records with ``question``, ``choices`` (a list), ``answer`` (letter or 0-based
    index) and ``subject`` (optional: ``subject`` or ``"default"`` when absent)."""
    out = []
    for i, rec in enumerate(ds.records):
        where = ds.where(i)
        q = _text_field(rec.get("question"), "question", where)
        choices = rec.get("choices")
        if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
            raise DataError(f"expected a list of 2 to {len(LETTERS)} answer texts, got {choices!r}",
                            where[0], where[1], "choices")
        choices = [_text_field(c, "choices", where) for c in choices]
        if "answer" not in rec:
            raise DataError("missing: expected the correct choice's letter or 0-based index", where[0], where[1],
                            "answer")
        ans = _answer_index(rec["answer"], len(choices), where)
        subj = rec.get("subject", subject or "default")
        subj = _text_field(subj, "subject", where).strip()
        out.append(Question(q, choices, ans, subj, where))
    return out


def subject_from_filename(path: str | Path) -> str:
    """``high_school_physics_test.csv`` -> ``high_school_physics`` (MMLU's file naming)."""
    stem = Path(path).stem
    for suffix in SPLIT_SUFFIXES:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def read_mmlu_csv(path: str | Path) -> list[Question]:
    """The original MMLU layout: no header, ``question, choice A, ..., choice D, answer letter`` per row;
    the subject comes from the file name. Rows may hold 2-26 choices (all rows of a file alike)."""
    from lmtune.data import _read_text

    p = Path(path)
    text = _read_text(p)
    subject = subject_from_filename(p)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    out, start, width = [], 1, None
    try:
        for row in reader:
            line = start
            start = reader.line_num + 1
            if not any(cell.strip() for cell in row):
                continue
            if width is None:
                if len(row) < 4:
                    raise DataError(f"expected a question, at least 2 choices and an answer letter (MMLU layout, "
                                    f"no header), found {len(row)} columns", str(p), line)
                width = len(row)
            elif len(row) != width:
                raise DataError(f"expected {width} columns like the first row (question, {width - 2} choices, "
                                f"answer), found {len(row)}", str(p), line)
            where = (str(p), line)
            q = _text_field(row[0], "question", where)
            choices = [_text_field(c, f"choice {LETTERS[j]}", where) for j, c in enumerate(row[1:-1])]
            out.append(Question(q, choices, _answer_index(row[-1], len(choices), where), subject, where))
    except csv.Error as e:
        raise DataError(f"not valid CSV ({e}) in the record that starts on this line", str(p), start) from None
    if not out:
        raise DataError("the file has no questions", str(p))
    return out


def read_questions(source) -> list[Question]:
    """Questions from a ``.jsonl`` file, an MMLU ``.csv`` file, a folder of them, ``builtin:mcqa:SPLIT``,
    a :class:`~lmtune.data.Dataset` or a list of :class:`Question`.

    Raises
    ------
    DataError
        A bad record, named by file, line and field.
    """
    if isinstance(source, list) and all(isinstance(q, Question) for q in source):
        return list(source)
    if isinstance(source, Dataset):
        return questions_from_records(source)
    p = Path(str(source))
    if str(source).startswith("builtin:"):
        return questions_from_records(open_data(source))
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in (".csv", ".jsonl"))
        if not files:
            raise DataError("the folder has no .csv or .jsonl files of questions", str(p))
        return [q for f in files for q in read_questions(f)]
    if p.suffix.lower() == ".csv":
        if not p.is_file():
            raise DataError("file not found", str(p))
        return read_mmlu_csv(p)
    return questions_from_records(open_data(p))


# -- prompts -------------------------------------------------------------------------------------------

def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise LmtuneError(f"unknown prompt format {fmt!r}: expected one of {', '.join(FORMATS)}")


def description(subject: str, fmt: str = "letters") -> str:
    """The task description that opens every prompt of a subject."""
    _check_format(fmt)
    what = "multiple choice questions" if fmt == "letters" else "questions"
    about = "" if subject == "default" else " about " + " ".join(subject.split("_"))
    return f"The following are {what} (with answers){about}.\n\n"


def question_text(q: Question, fmt: str = "letters") -> str:
    """A question as the prompt shows it, ending in ``Answer:``."""
    _check_format(fmt)
    if fmt == "text":
        return f"Question: {q.question.strip()}\nAnswer:"
    return q.question.strip() + "\n" + "".join(f"{LETTERS[j]}. {c}\n" for j, c in enumerate(q.choices)) + "Answer:"


def choice_strings(q: Question, fmt: str = "letters") -> list[str]:
    """What each choice is scored as (without the leading space): letters, or the choice texts."""
    _check_format(fmt)
    return list(LETTERS[:len(q.choices)]) if fmt == "letters" else list(q.choices)


def build_prompt(q: Question, shots: list[Question] = (), fmt: str = "letters") -> str:
    """Description, the solved shots (each followed by a blank line), then the question."""
    parts = [description(q.subject, fmt)]
    for s in shots:
        parts.append(question_text(s, fmt) + " " + choice_strings(s, fmt)[s.answer] + "\n\n")
    parts.append(question_text(q, fmt))
    return "".join(parts)


def select_shots(questions: list[Question], dev: list[Question] | None, k: int) -> list[list[Question]]:
    """The first ``k`` dev questions of each question's subject (itself excluded)."""
    if k <= 0:
        return [[] for _ in questions]
    if not dev:
        raise LmtuneError(f"{k}-shot prompts need dev questions to take the shots from (--dev)")
    by_subject: dict[str, list[Question]] = {}
    for d in dev:
        by_subject.setdefault(d.subject, []).append(d)
    out = []
    for q in questions:
        pool = [d for d in by_subject.get(q.subject, [])
                if not (d.question == q.question and d.choices == q.choices)]
        if len(pool) < k:
            have = len(by_subject.get(q.subject, []))
            mine = f" ({len(pool)} besides the question itself)" if len(pool) < have else ""
            raise LmtuneError(f"{k}-shot prompts for subject {q.subject!r} need {k} dev questions of that subject; "
                              f"the dev data ({dev[0].where[0]}) has {have}{mine}")
        out.append(pool[:k])
    return out


def encode_pair(tokenizer, context: str, continuations: list[str]) -> tuple[list[int], list[list[int]]]:
    """Context tokens and each continuation's tokens, split as lm-evaluation-harness splits them."""
    n = len(context) - len(context.rstrip())
    if n:
        continuations = [context[-n:] + c for c in continuations]
        context = context[:-n]
    if not context:
        raise LmtuneError("a multiple-choice prompt cannot be empty")
    enc = tokenizer([context] + [context + c for c in continuations])["input_ids"]
    ctx = list(enc[0])
    conts = [list(w[len(ctx):]) for w in enc[1:]]
    for c, ids in zip(continuations, conts):
        if not ids:
            raise LmtuneError(f"the continuation {c!r} encodes to no tokens after its context")
    return ctx, conts


# -- scoring -------------------------------------------------------------------------------------------

@dataclass
class _Item:
    """A context to run once and the continuations (of one question) scored on it."""

    question: int
    group: object
    context: list[int]
    choices: list[int]               # which choices of the question
    continuations: list[list[int]]
    scores: np.ndarray | None = None  # (len(choices),) summed log-likelihoods, once scored


def model_max_length(lm: LM) -> int:
    """The longest sequence the model takes: its configured positions, else 2048 (the harness's fallback)."""
    cfg = lm.model.config
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = getattr(cfg, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return 2048


def _items(q_index: int, group, ctx: list[int], conts: list[list[int]], max_length: int) -> tuple[list[_Item], bool]:
    """Left-truncate each (context, continuation) to ``max_length + 1`` tokens, as the harness does;
    choices whose context is cut alike share an item."""
    by_start: dict[int, list[int]] = {}
    for k, c in enumerate(conts):
        if len(c) > max_length:
            raise LmtuneError(f"a choice of {len(c)} tokens is longer than the model's maximum length {max_length}")
        by_start.setdefault(max(0, len(ctx) + len(c) - (max_length + 1)), []).append(k)
    truncated = any(s > 0 for s in by_start)
    items = [_Item(q_index, (group, "truncated") if s else group, ctx[s:], ks, [conts[k] for k in ks])
             for s, ks in by_start.items()]
    return items, truncated


def _cache_from(kv, rows: torch.Tensor | None, config):
    from transformers import DynamicCache

    data = [(k if rows is None else k.index_select(0, rows), v if rows is None else v.index_select(0, rows))
            for k, v in kv]
    return DynamicCache(ddp_cache_data=data, config=config)


@torch.inference_mode()
def _score_group(lm: LM, items: list[_Item], virtual: torch.Tensor | None, batch_size: int) -> None:
    """Fill ``item.scores`` (summed log-likelihood of each continuation) for items sharing a prefix."""
    from transformers import DynamicCache

    from lmtune.features import _batch_cache
    from lmtune.methods.tuned import backbone_of

    bb = backbone_of(lm)
    head = lm.model.get_output_embeddings()
    device = lm.device
    embed = bb.get_input_embeddings()
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0

    # 1. The shared prefix (virtual tokens, then the common context tokens), once.
    S = common_prefix_length([it.context for it in items])
    S = S if S >= MIN_SHARED_PREFIX else 0
    prefix_kv, Q = None, 0
    if S or virtual is not None:
        emb = embed(torch.tensor([items[0].context[:S]], dtype=torch.long, device=device))
        if virtual is not None:
            emb = torch.cat([virtual.to(device=device, dtype=emb.dtype), emb], dim=1)
        Q = emb.shape[1]
        cache = DynamicCache(config=bb.config)
        bb(inputs_embeds=emb, past_key_values=cache, use_cache=True)
        prefix_kv = [(layer.keys, layer.values) for layer in cache.layers]

    order = sorted(range(len(items)), key=lambda i: len(items[i].context), reverse=True)
    for b0 in range(0, len(order), batch_size):
        batch = [items[i] for i in order[b0:b0 + batch_size]]
        B = len(batch)
        lengths = torch.tensor([len(it.context) - S for it in batch])
        T = int(lengths.max())
        ids = torch.full((B, T), pad, dtype=torch.long)
        mask = torch.zeros((B, Q + T), dtype=torch.long)
        mask[:, :Q] = 1
        for r, it in enumerate(batch):
            ids[r, :lengths[r]] = torch.tensor(it.context[S:])
            mask[r, Q:Q + lengths[r]] = 1
        ids, mask = ids.to(device), mask.to(device)
        multi = any(len(c) > 1 for it in batch for c in it.continuations)
        cache = _batch_cache(bb, prefix_kv, B) if prefix_kv is not None else (
            DynamicCache(config=bb.config) if multi else None)
        kwargs = {"position_ids": (Q + torch.arange(T, device=device)).expand(B, -1)} if Q else {}
        # 2. Each context's own tokens, once; the last position predicts every choice's first token.
        h = bb(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=cache is not None,
               **kwargs).last_hidden_state
        z = h[torch.arange(B, device=device), (lengths - 1).to(device)]  # (B, d)
        first = torch.log_softmax(head(z).float(), dim=-1)  # (B, V): the only full-vocabulary rows here
        for r, it in enumerate(batch):
            firsts = torch.tensor([c[0] for c in it.continuations], device=device)
            it.scores = first[r, firsts].double().cpu().numpy()
        if multi:
            _score_rest(lm, bb, head, batch, cache, mask, Q + lengths.to(device))


def _score_rest(lm: LM, bb, head, batch: list[_Item], cache, mask: torch.Tensor, ctx_end: torch.Tensor) -> None:
    """Tokens 2.. of every multi-token continuation, as (item, choice) rows over the contexts' cache."""
    device = lm.device
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    kv = [(layer.keys, layer.values) for layer in cache.layers]
    rows = [(r, j) for r, it in enumerate(batch) for j, c in enumerate(it.continuations) if len(c) > 1]
    per_row = sum(k.shape[1] * k.shape[3] * k.element_size() * 2 for k, _ in kv) * kv[0][0].shape[2]
    chunk = max(1, STEP2_CACHE_BYTES // max(per_row, 1))
    for c0 in range(0, len(rows), chunk):
        part = rows[c0:c0 + chunk]
        R = len(part)
        inputs = [batch[r].continuations[j][:-1] for r, j in part]
        M = max(len(x) for x in inputs)
        ids = torch.full((R, M), pad, dtype=torch.long)
        cmask = torch.zeros((R, M), dtype=torch.long)
        for i, x in enumerate(inputs):
            ids[i, :len(x)] = torch.tensor(x)
            cmask[i, :len(x)] = 1
        src = torch.tensor([r for r, _ in part], device=device)
        h = bb(input_ids=ids.to(device), attention_mask=torch.cat([mask[src], cmask.to(device)], dim=1),
               past_key_values=_cache_from(kv, src, bb.config), use_cache=True,
               position_ids=ctx_end[src, None] + torch.arange(M, device=device)).last_hidden_state  # (R, M, d)
        # Only the positions that predict a continuation token go through the output layer.
        ri = torch.tensor([i for i, x in enumerate(inputs) for _ in x], device=device)
        pi = torch.tensor([p for x in inputs for p in range(len(x))], device=device)
        targets = torch.tensor([t for r, j in part for t in batch[r].continuations[j][1:]], device=device)
        lp = torch.log_softmax(head(h[ri, pi]).float(), dim=-1).gather(1, targets[:, None])[:, 0]
        sums = torch.zeros(R, dtype=torch.float64, device=device).index_add_(0, ri, lp.double()).cpu().numpy()
        for i, (r, j) in enumerate(part):
            batch[r].scores[j] += sums[i]


def score_contexts(lm: LM, contexts: list[str], continuations: list[list[str]], *, groups: list | None = None,
                   batch_size: int = 8, max_length: int | None = None, virtual: torch.Tensor | None = None
                   ) -> tuple[list[np.ndarray], int]:
    """Summed log-likelihood of each continuation given its context (lm-evaluation-harness's
    ``loglikelihood`` requests, one context with several continuations at a time).

    Parameters
    ----------
    lm : LM
        The model as it is (adapters attached or not).
    contexts : list of str
        N prompts.
    continuations : list of list of str
        The continuations of each prompt, with their leading space (``" A"``).
    groups : list, optional
        A key per prompt; prompts with equal keys have their common token prefix computed once (by
        default all prompts form one group).
    batch_size : int
        Contexts per forward pass.
    max_length : int, optional
        Longest model input; default :func:`model_max_length` minus the virtual tokens.
    virtual : torch.Tensor, optional
        (1, P, d) embeddings prepended to every context (prompt tuning).

    Returns
    -------
    scores : list of np.ndarray
        (K_i,) float64 log-likelihoods per prompt.
    n_truncated : int
        Prompts cut from the left to fit ``max_length``.
    """
    P = 0 if virtual is None else int(virtual.shape[1])
    max_length = (model_max_length(lm) - P) if max_length is None else max_length
    if max_length < 2:
        raise LmtuneError(f"max_length must leave room for a context and a continuation, got {max_length}")
    groups = groups if groups is not None else [0] * len(contexts)
    items, n_truncated = [], 0
    for i, (ctx, conts) in enumerate(zip(contexts, continuations)):
        ctx_ids, cont_ids = encode_pair(lm.tokenizer, ctx, conts)
        its, cut = _items(i, groups[i], ctx_ids, cont_ids, max_length)
        items.extend(its)
        n_truncated += cut
    by_group: dict = {}
    for it in items:
        by_group.setdefault(it.group, []).append(it)
    model = lm.model
    was_training = model.training
    model.eval()
    try:
        for group_items in by_group.values():
            _score_group(lm, group_items, virtual, batch_size)
    finally:
        model.train(was_training)
    scores = [np.zeros(len(c)) for c in continuations]
    for it in items:
        scores[it.question][it.choices] = it.scores
    return scores, n_truncated


# -- metrics and the benchmark -------------------------------------------------------------------------

def _mean_stderr(x: np.ndarray) -> float | None:
    """Standard error of a mean, with the sample standard deviation (as the harness reports it)."""
    return float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None


def accuracy_report(questions: list[Question], scores: list[np.ndarray], fmt: str = "letters") -> dict:
    """``acc`` and ``acc_norm`` per subject and overall, from each question's choice log-likelihoods.

    ``overall`` holds the micro average (every question weighs the same: the harness's MMLU score) and
    the macro average (every subject weighs the same), with the micro average's standard error.
    """
    preds, norms, acc, acc_norm = [], [], [], []
    for q, ll in zip(questions, scores):
        lengths = np.array([float(len(s)) for s in choice_strings(q, fmt)])
        p, pn = int(np.argmax(ll)), int(np.argmax(ll / lengths))
        preds.append(p)
        norms.append(pn)
        acc.append(float(p == q.answer))
        acc_norm.append(float(pn == q.answer))
    acc, acc_norm = np.array(acc), np.array(acc_norm)
    subjects: dict[str, dict] = {}
    for s in dict.fromkeys(q.subject for q in questions):
        idx = [i for i, q in enumerate(questions) if q.subject == s]
        subjects[s] = {"n": len(idx), "acc": float(acc[idx].mean()), "acc_norm": float(acc_norm[idx].mean()),
                       "chance": float(np.mean([1 / len(questions[i].choices) for i in idx]))}
    overall = {"n": len(questions), "acc": float(acc.mean()), "acc_norm": float(acc_norm.mean()),
               "acc_stderr": _mean_stderr(acc), "acc_norm_stderr": _mean_stderr(acc_norm),
               "acc_macro": float(np.mean([v["acc"] for v in subjects.values()])),
               "acc_norm_macro": float(np.mean([v["acc_norm"] for v in subjects.values()])),
               "chance": float(np.mean([1 / len(q.choices) for q in questions]))}
    return {"overall": overall, "subjects": subjects, "predictions": preds, "predictions_norm": norms}


def limit_per_subject(questions: list[Question], limit: int | None) -> list[Question]:
    """The first ``limit`` questions of each subject, in file order (the harness's ``--limit`` per task)."""
    if limit is None:
        return questions
    seen: dict[str, int] = {}
    out = []
    for q in questions:
        if seen.get(q.subject, 0) < limit:
            out.append(q)
            seen[q.subject] = seen.get(q.subject, 0) + 1
    return out


def _estimator(run, model):
    """The fitted estimator of a run folder, refusing runs that leave the model unchanged."""
    from lmtune.methods import load_run
    from lmtune.methods.tuned import TunedClassifier

    est = load_run(run, model=model)
    while hasattr(est, "estimator"):  # a temperature-scaled run: temperature acts on label logits only
        est = est.estimator
    if not isinstance(est, TunedClassifier):
        raise LmtuneError(f"{run} is a {est.method} run: it adapts only its own task's label logits and leaves the "
                          "model unchanged, so it would score exactly as the base model (use --model instead)")
    return est


def evaluate_multiple_choice(data, *, model: "LM | str | None" = None, run=None, dev=None, k_shot: int = 0,
                             fmt: str = "letters", limit: int | None = None, batch_size: int = 8,
                             max_length: int | None = None, per_question: bool = False) -> dict:
    """Score a multiple-choice benchmark and report ``acc`` and ``acc_norm`` per subject and overall.

    Parameters
    ----------
    data : str, Path, Dataset or list of Question
        The questions (see :func:`read_questions`).
    model : LM or str, optional
        The base model (default: the run's, or ``smollm2-135m``).
    run : str or Path, optional
        A run folder: its adaptation is attached while scoring.
    dev : same as ``data``, optional
        Questions to take the k-shot examples from.
    k_shot : int
        Solved examples in each prompt (the first k dev questions of the subject).
    fmt : str
        ``letters`` (continuations " A", " B", ...) or ``text`` (the choice texts).
    limit : int, optional
        Only the first ``limit`` questions of each subject.
    batch_size : int
        Contexts per forward pass.
    max_length : int, optional
        Longest model input in tokens (default: the model's).
    per_question : bool
        Add each question's choice log-likelihoods and predictions under ``"questions"``.

    Returns
    -------
    dict
        JSON-able: ``overall`` (``acc``, ``acc_norm`` micro, their standard errors, ``acc_macro``,
        ``acc_norm_macro``, ``chance``), ``subjects`` (``n``, ``acc``, ``acc_norm`` each), the settings,
        ``n_truncated`` and timings.
    """
    from lmtune.models import as_lm

    _check_format(fmt)
    if k_shot < 0:
        raise LmtuneError(f"k_shot must be >= 0, got {k_shot}")
    questions = limit_per_subject(read_questions(data), limit)
    if not questions:
        raise LmtuneError("no questions to score")
    dev_questions = read_questions(dev) if dev is not None else None
    shots = select_shots(questions, dev_questions, k_shot)  # before the model loads: a bad --dev fails at once
    t0 = time.perf_counter()
    est = _estimator(run, model) if run is not None else None
    lm = est.lm if est is not None else as_lm(model or DEFAULT_MODEL)
    load_seconds = time.perf_counter() - t0
    contexts = [build_prompt(q, s, fmt) for q, s in zip(questions, shots)]
    conts = [[" " + c for c in choice_strings(q, fmt)] for q in questions]
    groups = [q.subject for q in questions]
    t0 = time.perf_counter()
    if est is not None:
        with est.attached():
            virtual = est._virtual_prefix(1)
            scores, n_truncated = score_contexts(lm, contexts, conts, groups=groups, batch_size=batch_size,
                                                 max_length=max_length, virtual=virtual)
    else:
        scores, n_truncated = score_contexts(lm, contexts, conts, groups=groups, batch_size=batch_size,
                                             max_length=max_length)
    seconds = time.perf_counter() - t0
    rep = accuracy_report(questions, scores, fmt)
    out = {"model": lm.name, "run": str(run) if run is not None else None,
           "method": est.method if est is not None else None,
           "data": str(data) if not isinstance(data, (Dataset, list)) else getattr(data, "path", "<memory>"),
           "dev": None if dev is None else (str(dev) if not isinstance(dev, (Dataset, list))
                                            else getattr(dev, "path", "<memory>")),
           "k_shot": k_shot, "format": fmt, "limit": limit, "n": len(questions),
           "overall": rep["overall"], "subjects": rep["subjects"], "n_truncated": int(n_truncated),
           "seconds": seconds, "questions_per_second": len(questions) / seconds if seconds > 0 else None,
           "load_seconds": load_seconds}
    if per_question:
        out["questions"] = [{"where": f"{q.where[0]}:{q.where[1]}", "subject": q.subject, "answer": q.answer,
                             "pred": p, "pred_norm": pn, "loglik": [float(x) for x in ll]}
                            for q, ll, p, pn in zip(questions, scores, rep["predictions"], rep["predictions_norm"])]
    return out


def report_text(res: dict) -> str:
    """A per-subject table and the overall scores, for the terminal."""
    from lmtune.report import table

    rows = [{"subject": s, **v} for s, v in res["subjects"].items()]
    o = res["overall"]
    rows.append({"subject": "all questions (micro)", "n": o["n"], "acc": o["acc"], "acc_norm": o["acc_norm"],
                 "chance": o["chance"]})
    rows.append({"subject": "mean of subjects (macro)", "n": len(res["subjects"]), "acc": o["acc_macro"],
                 "acc_norm": o["acc_norm_macro"]})
    what = res["run"] + f" ({res['method']})" if res["run"] else res["model"]
    head = (f"{what} on {res['data']}: {res['k_shot']}-shot, {res['format']} format, {res['n']} questions in "
            f"{res['seconds']:.1f} s ({res['questions_per_second']:.2f} questions/s)")
    if res["n_truncated"]:
        head += f"; {res['n_truncated']} prompts cut from the left to fit the model"
    stderr = (f"accuracy {o['acc']:.4f} +- {o['acc_stderr']:.4f} (standard error)" if o["acc_stderr"] is not None
              else "")
    return "\n".join([head, table(rows, [("subject", "subject"), ("n", "n"), ("acc", "acc"),
                                         ("acc_norm", "acc_norm"), ("chance", "chance")])] + ([stderr] if stderr else []))

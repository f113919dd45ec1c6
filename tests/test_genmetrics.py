"""Generation metrics: agreement with rouge-score and sacrebleu called directly, ROUGE-L against
hand-worked LCS values, several references per record, exact match, errors."""

from __future__ import annotations

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from lmtune.errors import DataError, LmtuneError
from lmtune.genmetrics import generation_report, lcs_length, normalize_text

PREDS = ["the cat sat on the mat", "police killed the gunman yesterday", "a quick brown fox jumps",
         "it is raining in the city today", "completely unrelated words here"]
REFS = ["the cat is on the mat", "police kill the gunman", "the quick brown fox jumped over the dog",
        "today it rains in the city", "nothing in common at all"]


@pytest.mark.parametrize("stem", [True, False])
def test_rouge_agrees_with_rouge_score(stem):
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=stem)
    direct = [scorer.score(r, p) for p, r in zip(PREDS, REFS)]
    rep = generation_report(PREDS, REFS, metrics=["rouge"], stem=stem)
    assert rep["n"] == len(PREDS) and rep["rouge"]["stemmed"] is stem
    for t in ("rouge1", "rouge2", "rougeL"):
        for ours, field in (("precision", "precision"), ("recall", "recall"), ("f1", "fmeasure")):
            want = sum(getattr(d[t], field) for d in direct) / len(direct)
            assert rep["rouge"][t][ours] == pytest.approx(want, abs=1e-12)
    assert "bleu" not in rep and "exact" not in rep


def test_bleu_agrees_with_sacrebleu():
    rep = generation_report(PREDS, REFS, metrics=["bleu"])["bleu"]
    direct = sacrebleu.corpus_bleu(PREDS, [REFS])
    assert rep["score"] == pytest.approx(direct.score, abs=1e-12)
    assert rep["precisions"] == pytest.approx(direct.precisions)
    assert rep["brevity_penalty"] == pytest.approx(direct.bp)
    assert (rep["sys_len"], rep["ref_len"]) == (direct.sys_len, direct.ref_len)
    assert rep["signature"].startswith("nrefs:1|") and "tok:13a" in rep["signature"]
    assert 0 < rep["score"] < 100


# ROUGE-L by hand (rouge-score lowercases and splits on non-alphanumerics):
#  1. pred "the cat sat on the mat" (6 tokens), ref "the cat is on the mat" (6 tokens):
#     LCS = "the cat on the mat" = 5, so P = 5/6, R = 5/6, F = 5/6.
#  2. pred "one two three four five" (5), ref "two four six" (3): LCS = "two four" = 2,
#     P = 2/5, R = 2/3, F = 2 (2/5)(2/3) / (2/5 + 2/3) = (8/15) / (16/15) = 1/2.
#  3. pred "police killed the gunman" (4), ref "police kill the gunman" (4): unstemmed, LCS = "police the
#     gunman" = 3, P = R = F = 3/4; stemmed (killed -> kill), LCS = 4, P = R = F = 1.
HAND = [("the cat sat on the mat", "the cat is on the mat", False, 5, 5 / 6, 5 / 6, 5 / 6),
        ("one two three four five", "two four six", False, 2, 2 / 5, 2 / 3, 1 / 2),
        ("police killed the gunman", "police kill the gunman", False, 3, 3 / 4, 3 / 4, 3 / 4),
        ("police killed the gunman", "police kill the gunman", True, None, 1.0, 1.0, 1.0)]


@pytest.mark.parametrize("pred,ref,stem,lcs,P,R,F", HAND)
def test_rouge_l_hand_worked(pred, ref, stem, lcs, P, R, F):
    if lcs is not None:
        assert lcs_length(pred.split(), ref.split()) == lcs
    r = generation_report([pred], [ref], metrics=["rouge"], stem=stem)["rouge"]["rougeL"]
    assert (r["precision"], r["recall"], r["f1"]) == pytest.approx((P, R, F), abs=1e-12)


def test_lcs_length_edge_cases():
    assert lcs_length([], "abc") == 0
    assert lcs_length("abcbdab", "bdcaba") == 4  # the textbook example (CLRS): "bcba"
    assert lcs_length("aaaa", "aa") == 2


def test_rouge_takes_the_best_reference_per_record():
    good, bad = "the cat is on the mat", "dogs bark loudly at night"
    one = generation_report([PREDS[0]], [[good]], metrics=["rouge"])["rouge"]
    for refs in ([bad, good], [good, bad]):
        multi = generation_report([PREDS[0]], [refs], metrics=["rouge"])["rouge"]
        for t in ("rouge1", "rouge2", "rougeL"):
            assert multi[t]["f1"] == pytest.approx(one[t]["f1"])
    worst = generation_report([PREDS[0]], [[bad]], metrics=["rouge"])["rouge"]
    assert worst["rouge1"]["f1"] < one["rouge1"]["f1"]


def test_bleu_several_references_with_uneven_counts():
    preds = ["the cat sat on the mat", "hi there"]
    refs = [["the cat is on the mat", "a cat sat on the mat"], ["hello there my good friend"]]
    rep = generation_report(preds, refs, metrics=["bleu"])["bleu"]
    # sacrebleu's own multi-reference streams, None where a record has no second reference.
    direct = sacrebleu.corpus_bleu(preds, [[refs[0][0], refs[1][0]], [refs[0][1], None]])
    assert rep["score"] == pytest.approx(direct.score)
    assert rep["signature"].startswith("nrefs:var|")
    # Repeating a record's reference changes neither clipped counts nor the closest reference length,
    # so padding with None must equal padding by repetition ...
    repeated = sacrebleu.corpus_bleu(preds, [[refs[0][0], refs[1][0]], [refs[0][1], refs[1][0]]])
    assert rep["score"] == pytest.approx(repeated.score)
    # ... while padding with "" would not: the 2-token hypothesis is closer to length 0 than to 5.
    empty = sacrebleu.corpus_bleu(preds, [[refs[0][0], refs[1][0]], [refs[0][1], ""]])
    assert empty.ref_len != rep["ref_len"]


def test_exact_match_normalisation_and_any_reference():
    preds = ["  Paris ", "the  answer\tis 4", "Berlin", "rome"]
    refs = [["Paris"], ["the answer is 4"], ["Bonn", "Berlin"], ["Rome"]]
    rep = generation_report(preds, refs, metrics=["exact"], per_record=True)
    assert [r["exact"] for r in rep["records"]] == [True, True, True, False]
    assert rep["exact"]["rate"] == 0.75 and rep["exact"]["matches"] == 3
    folded = generation_report(preds, refs, metrics=["exact"], ignore_case=True)["exact"]
    assert folded["rate"] == 1.0 and folded["ignore_case"] is True
    assert normalize_text(" A \n b ") == "A b" and normalize_text("ÄB", ignore_case=True) == "äb"


def test_report_is_json_and_metrics_string():
    import json

    rep = generation_report(PREDS, REFS, metrics="rouge,exact", per_record=True)
    assert set(rep) == {"n", "rouge", "exact", "records"}
    assert json.loads(json.dumps(rep)) == rep
    assert rep["records"][0]["rougeL_f1"] == pytest.approx(5 / 6)


def test_errors():
    with pytest.raises(LmtuneError, match="2 predictions but 1 references"):
        generation_report(["a", "b"], ["a"])
    with pytest.raises(LmtuneError, match="unknown metric 'meteor'"):
        generation_report(["a"], ["a"], metrics=["rouge", "meteor"])
    with pytest.raises(DataError, match=r"<references>:2: empty references"):
        generation_report(["a", "b"], ["a", ["", "  "]])
    with pytest.raises(DataError, match=r"<references>:1: expected a reference string or a non-empty list"):
        generation_report(["a"], [[]])
    with pytest.raises(DataError, match=r"<predictions>:2: expected a string, got NoneType"):
        generation_report(["a", None], ["a", "b"])
    with pytest.raises(LmtuneError, match="no predictions"):
        generation_report([], [])
    with pytest.raises(LmtuneError, match="predictions must be a list"):
        generation_report("abc", ["abc"])

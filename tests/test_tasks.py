"""Label words, targets and prompt encoding, on the tiny model's word-level tokenizer."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest

from lmtune.data import Dataset
from lmtune.errors import DataError, LmtuneError
from lmtune.tasks import ClassificationTask, label_key, parse_label_words

TEMPLATE = "Review: {text}\nIs this review positive? Answer yes or no."


@pytest.fixture(scope="module")
def tok(tiny_lm):
    return tiny_lm.tokenizer


def task(**kw) -> ClassificationTask:
    kw.setdefault("label_words", "negative=no,positive=yes")
    return ClassificationTask(kw.pop("template", TEMPLATE), **kw)


# -- label words --------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["0=no,1=yes", " 0 = no , 1 = yes ", {"0": "no", "1": "yes"}, {0: "no", 1: "yes"},
                                  [("0", "no"), (1.0, " yes")]])
def test_parse_label_words_forms(spec):
    out = parse_label_words(spec)
    assert out == {"0": "no", "1": "yes"}
    assert list(out) == ["0", "1"]  # order fixes the class indices


def test_parse_label_words_keeps_order_and_splits_at_first_equals():
    assert list(parse_label_words("pos=yes,neg=no,mid=a=b").items()) == [("pos", "yes"), ("neg", "no"),
                                                                         ("mid", "a=b")]


@pytest.mark.parametrize("spec, msg", [
    ("0=no,1", r"expected LABEL=WORD pairs .* got '1'"),
    ("0=no,1=yes,", r"expected LABEL=WORD pairs .* got ''"),
    ("0=no,0=nope", r"label '0' is given twice"),
    ([(1, "yes"), (1.0, "no")], r"label '1' is given twice"),
    ([("0", "no"), (1.0, "yes"), ("1", "sure")], r"label '1' is given twice"),
    ("1=yes", r"at least two labels"),
    ("0=no,1= ", r"empty label or word"),
    ("=no,1=yes", r"empty label or word"),
])
def test_parse_label_words_errors(spec, msg):
    with pytest.raises(LmtuneError, match=msg):
        parse_label_words(spec)


def test_label_keys_are_canonical():
    assert label_key(1) == label_key(1.0) == label_key("1") == label_key(" 1 ") == "1"
    assert label_key(True) == "true" and label_key(2.5) == "2.5"
    t = task(label_words={1: "yes", 0: "no"}, label_field="y")
    ds = Dataset.from_records([{"text": "a", "y": 1}, {"text": "b", "y": "0"}, {"text": "c", "y": 1.0},
                               {"text": "d", "y": " 1"}])
    assert t.labels == ["1", "0"]
    np.testing.assert_array_equal(t.targets(ds), [0, 1, 0, 0])


def test_task_round_trips_through_dict():
    t = task(label_words={1: "yes", 0: "no"}, chat=False, max_length=64, label_field="y")
    t2 = ClassificationTask.from_dict(t.to_dict())
    assert t2.to_dict() == t.to_dict() and t2.labels == ["1", "0"]


def test_max_length_floor():
    with pytest.raises(LmtuneError, match="max_length must be at least 8"):
        task(max_length=4)


# -- targets ------------------------------------------------------------------------------------------


def test_unknown_label_names_file_line_field_and_expected_labels():
    ds = Dataset([{"text": "a", "label": "positive"}, {"text": "b", "label": "neutral"}], [3, 9], "reviews.jsonl")
    with pytest.raises(DataError) as e:
        task().targets(ds)
    assert str(e.value) == ("reviews.jsonl:9, field 'label': unknown label 'neutral': expected one of "
                            "['negative', 'positive'] (from --label-words)")
    assert (e.value.path, e.value.line, e.value.field) == ("reviews.jsonl", 9, "label")


@pytest.mark.parametrize("rec", [{"text": "b"}, {"text": "b", "label": None}, {"text": "b", "label": "  "}])
def test_missing_label(rec):
    ds = Dataset([{"text": "a", "label": "negative"}, rec], [1, 4], "d.csv")
    with pytest.raises(DataError, match=r"^d\.csv:4, field 'label': missing label \(expected one of "
                                        r"\['negative', 'positive'\]\)"):
        task().targets(ds)


def test_label_field_option():
    ds = Dataset.from_records([{"text": "a", "sentiment": "positive", "label": "junk"}])
    assert task(label_field="sentiment").targets(ds).tolist() == [1]


# -- label tokens -------------------------------------------------------------------------------------


def test_label_token_ids_are_the_words_first_tokens(tok):
    ids = task().label_token_ids(tok)
    assert ids == [tok.convert_tokens_to_ids("no"), tok.convert_tokens_to_ids("yes")]
    assert len(set(ids)) == 2


def test_label_words_sharing_a_first_token_name_both_words(tok):
    t = task(label_words="negative=yes no,positive=yes please")
    with pytest.raises(LmtuneError) as e:
        t.label_token_ids(tok)
    msg = str(e.value)
    assert "'yes please' (label 'positive')" in msg and "'yes no' (label 'negative')" in msg
    assert "same token 'yes'" in msg


def test_multi_token_label_words_warn(tok):
    t = task(label_words="negative=no way,positive=yes")
    with pytest.warns(UserWarning, match=r"\['no way'\] span several tokens"):
        assert t.label_token_ids(tok)[0] == tok.convert_tokens_to_ids("no")


# -- prompts ------------------------------------------------------------------------------------------


def test_encode_with_chat_template(tok):
    ds = Dataset.from_records([{"text": "great coffee", "label": "positive"}])
    enc = task().encode(tok, ds)
    toks = tok.convert_ids_to_tokens(enc.input_ids[0])
    assert toks[0] == "<|user|>" and toks[-2:] == ["<|end|>", "<|assistant|>"]  # the answer comes next
    assert toks[1:5] == ["review", ":", "great", "coffee"]
    assert enc.y.tolist() == [1] and enc.n_truncated == 0


def test_encode_without_chat(tok):
    ds = Dataset.from_records([{"text": "great coffee", "label": "positive"}])
    ids = task(chat=False).encode(tok, ds).input_ids[0]
    plain = TEMPLATE.format(text="great coffee")
    assert ids == tok(plain)["input_ids"]
    assert "<|user|>" not in tok.convert_ids_to_tokens(ids)


def test_encode_without_chat_keeps_the_bos_a_tokenizer_adds(tok):
    from tokenizers import processors

    bos_tok = copy.deepcopy(tok)
    bos_tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos_tok.bos_token_id)])
    ds = Dataset.from_records([{"text": "great coffee", "label": "positive"}])
    ids = task(chat=False).encode(bos_tok, ds).input_ids[0]
    assert ids[0] == bos_tok.bos_token_id
    assert ids[1:] == tok(TEMPLATE.format(text="great coffee"))["input_ids"]


def test_encode_unlabeled_skips_the_labels(tok):
    ds = Dataset.from_records([{"text": "great coffee"}, {"text": "bad", "label": "whatever"}])
    enc = task().encode(tok, ds, labeled=False)
    assert enc.y is None and len(enc.input_ids) == 2
    with pytest.raises(DataError, match="missing label"):
        task().encode(tok, ds)


def test_encode_validates_every_record_before_tokenizing(tok):
    # The missing field is reported at its line, not as a failure part-way through.
    ds = Dataset([{"text": "a", "label": "positive"}, {"txt": "b", "label": "negative"}], [1, 2], "d.jsonl")
    with pytest.raises(DataError, match=r"^d\.jsonl:2, field 'text': missing or empty"):
        task().encode(tok, ds)


# -- over-long prompts --------------------------------------------------------------------------------

LONG = " ".join(["the coffee was fine"] * 20) + " but the service was slow sentence end"


@pytest.mark.parametrize("chat", [True, False])
def test_long_prompts_lose_tokens_from_the_left_of_the_text(tok, chat):
    recs = [{"text": LONG, "label": "negative"}, {"text": "short one", "label": "positive"},
            {"text": "long again " + LONG, "label": "positive"}]
    ds = Dataset(recs, [1, 2, 5], "d.jsonl")
    t = task(chat=chat, max_length=30)
    with pytest.warns(UserWarning, match=r"^d\.jsonl: 2 of 3 prompts were longer than max_length=30 tokens") as w:
        enc = t.encode(tok, ds)
    assert len(w) == 1
    assert enc.n_truncated == 2
    full = [t.prompt(tok, {"text": r["text"]}) for r in recs]
    assert len(full[0]) > 30 and len(full[2]) > 30 and len(full[1]) <= 30
    assert enc.input_ids[1] == full[1]  # short prompts are untouched
    # Split a prompt into the tokens before the field, the field, and the tokens after it (word-level
    # tokenizer: one word, one token).
    marker = t.prompt(tok, {"text": "coffee"})
    k = marker.index(tok.convert_tokens_to_ids("coffee"))
    before, after = marker[:k], marker[k + 1:]
    for i in (0, 2):
        ids = enc.input_ids[i]
        field = tok.encode(recs[i]["text"], add_special_tokens=False)
        assert len(ids) == 30  # cut to fit, and no more than needed
        # the instruction before the field and the question (and chat markers) after it are intact ...
        assert ids[:len(before)] == before and ids[-len(after):] == after
        # ... and what is left of the field is its end: the cut came from its left
        kept = ids[len(before):-len(after)]
        assert 0 < len(kept) < len(field) and field[-len(kept):] == kept
        assert tok.convert_ids_to_tokens(kept)[-2:] == ["sentence", "end"]


def test_truncation_cuts_the_longest_field(tok):
    t = task(template="Question: {title}\n{text}\nPositive?", max_length=20, chat=False)
    ds = Dataset.from_records([{"title": "the review", "text": LONG, "label": "positive"}])
    with pytest.warns(UserWarning, match="1 of 1 prompts"):
        ids = t.encode(tok, ds).input_ids[0]
    toks = tok.convert_ids_to_tokens(ids)
    assert len(ids) == 20
    assert toks[:4] == ["question", ":", "the", "review"]  # the short field is whole
    assert toks[-4:] == ["sentence", "end", "positive", "?"]  # the long one lost its beginning


def test_prompt_that_cannot_fit_even_with_the_field_emptied(tok):
    t = task(max_length=8)
    ds = Dataset([{"text": "ok", "label": "positive"}, {"text": LONG, "label": "negative"}], [1, 7], "d.jsonl")
    with pytest.raises(DataError, match=r"^d\.jsonl:1, field 'text': the prompt does not fit max_length=8 tokens "
                                        r"even with this field emptied"):
        t.encode(tok, ds)


def test_no_warning_when_nothing_is_cut(tok, recwarn):
    ds = Dataset.from_records([{"text": "short", "label": "positive"}])
    assert task().encode(tok, ds).n_truncated == 0
    assert not [w for w in recwarn if re.search("max_length", str(w.message))]

"""Multiple-choice benchmarks: readers, prompt format, k-shot prompts, and the scorer against a direct
per-choice forward pass (lm-evaluation-harness semantics written out in the test), acc and acc_norm on a
constructed case, adapted runs, the CLI, and one short real-model check."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import lmtune
from lmtune.cli import main
from lmtune.errors import DataError, LmtuneError
from lmtune.multiple_choice import (Question, accuracy_report, build_prompt, choice_strings, description,
                                    encode_pair, evaluate_multiple_choice, limit_per_subject, question_text,
                                    read_questions, score_contexts, select_shots)

# Words the tiny model's word-level vocabulary knows, so the prompts are not all <unk>.
TINY_QUESTIONS = [
    {"question": "is this review positive ?", "choices": ["yes", "no", "maybe", "the answer is no"], "answer": "A",
     "subject": "reviews"},
    {"question": "is the text a question ?", "choices": ["no", "yes or no", "yes", "maybe"], "answer": 2,
     "subject": "reviews"},
    {"question": "this sentence is the answer", "choices": ["a review", "the text", "no"], "answer": "C",
     "subject": "text_questions"},
    {"question": "answer the question : yes or no ?", "choices": ["yes", "no"], "answer": "b",
     "subject": "text_questions"},
    {"question": "is this a positive review or a question ?", "choices": ["a positive review", "a question",
                                                                         "maybe", "no"], "answer": 1,
     "subject": "reviews"},
    {"question": "the text is a review", "choices": ["yes", "no"], "answer": "A", "subject": "text_questions"},
]

TINY_DEV = [
    {"question": "is this a review ?", "choices": ["yes", "no"], "answer": "A", "subject": "reviews"},
    {"question": "is the review positive or no ?", "choices": ["positive", "no", "maybe"], "answer": 1,
     "subject": "reviews"},
    {"question": "the answer is yes", "choices": ["a question", "a sentence"], "answer": "B",
     "subject": "text_questions"},
    {"question": "this is a text", "choices": ["yes", "no", "maybe"], "answer": 0, "subject": "text_questions"},
]


def write_jsonl(path, rows, blank_first=False):
    path.write_text(("\n" if blank_first else "") + "".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- readers -------------------------------------------------------------------------------------------

def test_read_jsonl_letters_indices_and_lines(tmp_path):
    qs = read_questions(write_jsonl(tmp_path / "q.jsonl", TINY_QUESTIONS, blank_first=True))
    assert [q.answer for q in qs] == [0, 2, 2, 1, 1, 0]
    assert [q.subject for q in qs] == ["reviews", "reviews", "text_questions", "text_questions", "reviews",
                                       "text_questions"]
    assert qs[0].where == (str(tmp_path / "q.jsonl"), 2) and qs[4].where[1] == 6
    assert qs[2].choices == ["a review", "the text", "no"]


def test_read_mmlu_csv_layout_and_folder(tmp_path):
    folder = tmp_path / "mmlu"
    folder.mkdir()
    (folder / "high_school_physics_test.csv").write_text(
        '"What is the unit of force?",newton,joule,watt,pascal,A\n'
        '"A question\nover two lines?",one,two,three,four,D\n'
        'Third,a,b,c,d,b\n')
    (folder / "anatomy_dev.csv").write_text("Which organ pumps blood?,liver,heart,lung,skin,B\n")
    qs = read_questions(folder / "high_school_physics_test.csv")
    assert [q.subject for q in qs] == ["high_school_physics"] * 3
    assert [q.answer for q in qs] == [0, 3, 1]
    assert qs[1].question == "A question\nover two lines?" and qs[1].choices == ["one", "two", "three", "four"]
    assert [q.where[1] for q in qs] == [1, 2, 4]  # the record that spans lines 2-3 starts on line 2
    both = read_questions(folder)
    assert [q.subject for q in both] == ["anatomy"] + ["high_school_physics"] * 3


def test_read_builtin_mcqa():
    test, dev = read_questions("builtin:mcqa:test"), read_questions("builtin:mcqa:dev")
    assert (len(test), len(dev)) == (78, 30)
    subjects = {q.subject for q in test}
    assert len(subjects) == 6 and subjects == {q.subject for q in dev}
    assert all(len(q.choices) == 4 for q in test + dev)
    counts = np.bincount([q.answer for q in test], minlength=4)
    assert counts.min() >= 19 and counts.max() <= 20  # a constant-letter answer scores about chance


@pytest.mark.parametrize("record,field,match", [
    ({"question": "q", "choices": ["a", "b"]}, "answer", "missing"),
    ({"question": "q", "choices": ["a", "b"], "answer": "C"}, "answer", "a letter A-B or a 0-based index below 2"),
    ({"question": "q", "choices": ["a", "b"], "answer": 2}, "answer", "index 2 is out of range"),
    ({"question": "q", "choices": ["a", "b"], "answer": True}, "answer", "got True"),
    ({"question": "q", "choices": "a,b", "answer": "A"}, "choices", "expected a list of 2 to 26"),
    ({"question": "q", "choices": ["a", ""], "answer": "A"}, "choices", "non-empty string"),
    ({"question": " ", "choices": ["a", "b"], "answer": "A"}, "question", "non-empty string"),
    ({"question": "q", "choices": ["a", "b"], "answer": "A", "subject": 3}, "subject", "non-empty string"),
])
def test_jsonl_errors_name_file_line_and_field(tmp_path, record, field, match):
    path = write_jsonl(tmp_path / "bad.jsonl", [TINY_QUESTIONS[0], record])
    with pytest.raises(DataError, match=match) as e:
        read_questions(path)
    assert (e.value.path, e.value.line, e.value.field) == (str(path), 2, field)


def test_csv_errors_name_file_line_and_field(tmp_path):
    header = tmp_path / "x_test.csv"
    header.write_text("question,A,B,C,D,answer\nq,a,b,c,d,A\n")
    with pytest.raises(DataError, match="got 'answer'") as e:
        read_questions(header)
    assert (e.value.line, e.value.field) == (1, "answer")
    ragged = tmp_path / "y_test.csv"
    ragged.write_text("q,a,b,c,d,A\nq,a,b,c,d,B\nq,a,b,c,B\n")
    with pytest.raises(DataError, match="expected 6 columns") as e:
        read_questions(ragged)
    assert e.value.line == 3
    with pytest.raises(DataError, match="file not found"):
        read_questions(tmp_path / "missing_test.csv")


# -- prompts -------------------------------------------------------------------------------------------

Q1 = Question("What is 2 plus 2? ", ["3", "4", "5", "22"], 1, "elementary_mathematics")
S1 = Question("What is 1 plus 1?", ["2", "3", "4", "11"], 0, "elementary_mathematics")
S2 = Question("What is 3 plus 1?", ["5", "6", "4", "31"], 2, "elementary_mathematics")


def test_prompt_format_letters_and_text():
    assert build_prompt(Q1) == ("The following are multiple choice questions (with answers) about elementary "
                                "mathematics.\n\nWhat is 2 plus 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:")
    assert build_prompt(Q1, fmt="text") == ("The following are questions (with answers) about elementary "
                                            "mathematics.\n\nQuestion: What is 2 plus 2?\nAnswer:")
    assert choice_strings(Q1) == ["A", "B", "C", "D"] and choice_strings(Q1, "text") == Q1.choices
    assert description("default") == "The following are multiple choice questions (with answers).\n\n"
    with pytest.raises(LmtuneError, match="unknown prompt format 'mc'"):
        question_text(Q1, "mc")


def test_k_shot_prompt():
    want = ("The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
            "What is 1 plus 1?\nA. 2\nB. 3\nC. 4\nD. 11\nAnswer: A\n\n"
            "What is 3 plus 1?\nA. 5\nB. 6\nC. 4\nD. 31\nAnswer: C\n\n"
            "What is 2 plus 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:")
    assert build_prompt(Q1, [S1, S2]) == want
    text = build_prompt(Q1, [S1], fmt="text")
    assert text.endswith("Question: What is 1 plus 1?\nAnswer: 2\n\nQuestion: What is 2 plus 2?\nAnswer:")


def test_select_shots_first_k_of_the_subject_without_the_question_itself():
    other = Question("Capital of France?", ["Paris", "Rome"], 0, "geography")
    dev = [other, S1, Q1, S2]
    assert select_shots([Q1], dev, 2) == [[S1, S2]]  # Q1 itself skipped, geography ignored
    assert select_shots([Q1, other], dev, 0) == [[], []]
    with pytest.raises(LmtuneError, match="subject 'geography' need 2 dev questions.*has 1"):
        select_shots([other], dev, 2)
    with pytest.raises(LmtuneError, match="need dev questions"):
        select_shots([Q1], None, 1)


def test_limit_is_per_subject():
    qs = [Question(f"q{i}", ["a", "b"], 0, s) for i, s in enumerate("xxyxyy")]
    assert [q.question for q in limit_per_subject(qs, 2)] == ["q0", "q1", "q2", "q4"]


def test_encode_pair_moves_trailing_space_to_the_continuation(tiny_lm):
    tok = tiny_lm.tokenizer
    ctx, conts = encode_pair(tok, "is this review positive ? ", ["yes", "no maybe"])
    assert ctx == tok("is this review positive ?")["input_ids"]
    assert conts == [tok("is this review positive ? yes")["input_ids"][len(ctx):],
                     tok("is this review positive ? no maybe")["input_ids"][len(ctx):]]
    assert [len(c) for c in conts] == [1, 2]


# -- the scorer against a direct forward pass ----------------------------------------------------------

def direct_logliks(lm, context: str, continuations: list[str], max_length: int | None = None,
                   virtual: torch.Tensor | None = None) -> np.ndarray:
    """One full forward pass per choice, the harness's way: encode context and context+continuation,
    split at the context's length, left-truncate to max_length + 1, full-vocabulary log-softmax."""
    tok = lm.tokenizer
    n = len(context) - len(context.rstrip())
    if n:
        continuations = [context[-n:] + c for c in continuations]
        context = context[:-n]
    ctx = tok(context)["input_ids"]
    P = 0 if virtual is None else virtual.shape[1]
    max_length = max_length or lm.model.config.max_position_embeddings - P
    out = []
    for c in continuations:
        cont = tok(context + c)["input_ids"][len(ctx):]
        inp = (ctx + cont)[-(max_length + 1):][:-1]
        ids = torch.tensor([inp], device=lm.device)
        with torch.no_grad():
            if virtual is None:
                logits = lm.model(input_ids=ids).logits[0]
            else:
                emb = torch.cat([virtual, lm.model.get_input_embeddings()(ids)], dim=1)
                logits = lm.model(inputs_embeds=emb).logits[0, P:]
        lp = torch.log_softmax(logits.double(), dim=-1)
        start = len(inp) - len(cont) + 1  # the position that predicts cont[0] is start - 1
        out.append(sum(float(lp[start - 1 + j, t]) for j, t in enumerate(cont)))
    return np.array(out)


def prompts(questions, fmt, dev=None, k=0):
    shots = select_shots(questions, dev, k)
    return ([build_prompt(q, s, fmt) for q, s in zip(questions, shots)],
            [[" " + c for c in choice_strings(q, fmt)] for q in questions], [q.subject for q in questions])


@pytest.mark.parametrize("fmt,k,batch_size", [("letters", 0, 8), ("text", 0, 2), ("letters", 2, 3), ("text", 2, 1)])
def test_scorer_equals_direct_forward_pass(tiny_lm, fmt, k, batch_size):
    qs = read_questions(lmtune.Dataset.from_records(TINY_QUESTIONS))
    dev = read_questions(lmtune.Dataset.from_records(TINY_DEV))
    contexts, conts, groups = prompts(qs, fmt, dev=dev, k=k)
    scores, n_truncated = score_contexts(tiny_lm, contexts, conts, groups=groups, batch_size=batch_size)
    assert n_truncated == 0
    for ctx, cs, got in zip(contexts, conts, scores):
        np.testing.assert_allclose(got, direct_logliks(tiny_lm, ctx, cs), rtol=0, atol=1e-5)
    if k:  # the shared few-shot prefix is what the fast path relies on
        from lmtune.features import common_prefix_length

        enc = [tiny_lm.tokenizer(c)["input_ids"] for c, g in zip(contexts, groups) if g == "reviews"]
        assert common_prefix_length(enc) > 20


def test_scorer_truncates_from_the_left_per_choice_as_the_harness(tiny_lm):
    qs = read_questions(lmtune.Dataset.from_records(TINY_QUESTIONS))
    contexts, conts, groups = prompts(qs, "text", dev=qs, k=2)
    L = 24  # shorter than every 2-shot prompt; choices of 1 to 4 tokens are cut differently
    scores, n_truncated = score_contexts(tiny_lm, contexts, conts, groups=groups, batch_size=4, max_length=L)
    assert n_truncated == len(qs)
    for ctx, cs, got in zip(contexts, conts, scores):
        np.testing.assert_allclose(got, direct_logliks(tiny_lm, ctx, cs, max_length=L), rtol=0, atol=1e-5)


def test_accuracy_and_acc_norm_on_a_constructed_case():
    qs = [Question("q1", ["aaaa aaaa aa", "bb"], 0, "s1"),   # 12 and 2 characters
          Question("q2", ["x", "yyy"], 1, "s2"),
          Question("q3", ["abc", "abd"], 0, "s1")]
    ll = [np.array([-6.0, -2.0]),   # acc: argmax 1 (wrong); per character -0.5 vs -1.0 -> 0 (right)
          np.array([-1.0, -2.0]),   # acc: 0 (wrong); per character -1.0 vs -0.667 -> 1 (right)
          np.array([-1.0, -3.0])]   # both right
    rep = accuracy_report(qs, ll, fmt="text")
    assert rep["predictions"] == [1, 0, 0] and rep["predictions_norm"] == [0, 1, 0]
    assert rep["subjects"]["s1"] == {"n": 2, "acc": 0.5, "acc_norm": 1.0, "chance": 0.5}
    assert rep["subjects"]["s2"]["acc"] == 0.0 and rep["subjects"]["s2"]["acc_norm"] == 1.0
    o = rep["overall"]
    assert o["acc"] == pytest.approx(1 / 3) and o["acc_norm"] == 1.0
    assert o["acc_macro"] == pytest.approx(0.25) and o["acc_norm_macro"] == 1.0
    assert o["acc_stderr"] == pytest.approx(np.sqrt(1 / 3) / np.sqrt(3))  # sample std of [0, 0, 1] / sqrt(3)
    # With letters every choice string is one character long, so acc_norm is acc.
    letters = accuracy_report(qs, ll, fmt="letters")["overall"]
    assert letters["acc_norm"] == letters["acc"] == pytest.approx(1 / 3)


def test_evaluate_reports_the_direct_logliks(tiny_lm, tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", TINY_QUESTIONS)
    res = evaluate_multiple_choice(path, model=tiny_lm, dev=path, k_shot=1, fmt="text", per_question=True,
                                   batch_size=2)
    assert res["n"] == 6 and set(res["subjects"]) == {"reviews", "text_questions"}
    assert res["subjects"]["reviews"]["n"] == 3 and res["k_shot"] == 1
    qs = read_questions(path)
    shots = select_shots(qs, qs, 1)
    for q, s, row in zip(qs, shots, res["questions"]):
        want = direct_logliks(tiny_lm, build_prompt(q, s, "text"), [" " + c for c in q.choices])
        np.testing.assert_allclose(row["loglik"], want, atol=1e-5)
        assert row["pred"] == int(np.argmax(want))
    acc = np.mean([r["pred"] == r["answer"] for r in res["questions"]])
    assert res["overall"]["acc"] == pytest.approx(acc)
    assert json.loads(json.dumps(res)) == res


# -- adapted runs --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_runs(tiny_lm, tmp_path_factory):
    from lmtune.tasks import ClassificationTask

    task = ClassificationTask("Review: {text}\nIs this review positive? Answer yes or no.",
                              {"negative": "no", "positive": "yes"})
    train = lmtune.load_builtin("reviews", "train").subset(range(16))
    d = tmp_path_factory.mktemp("mc-runs")
    runs = {}
    for name, cls, kw in (("lora", lmtune.LoraClassifier, {"rank": 4, "alpha": 8, "lr": 5e-2}),
                          ("prompt", lmtune.PromptTuningClassifier, {"virtual_tokens": 3, "lr": 5e-2}),
                          ("closed", lmtune.ClosedFormClassifier, {})):
        extra = {"epochs": 1, "batch_size": 8} if cls is not lmtune.ClosedFormClassifier else {"cache": False}
        runs[name] = cls(tiny_lm, task, progress=False, **kw, **extra).fit(train).save(d / name)
    return runs


@pytest.mark.parametrize("kind", ["lora", "prompt"])
def test_run_is_scored_with_its_adaptation_attached(tiny_lm, tiny_runs, tmp_path, kind):
    path = write_jsonl(tmp_path / "q.jsonl", TINY_QUESTIONS)
    res = evaluate_multiple_choice(path, model=tiny_lm, run=tiny_runs[kind], fmt="text", per_question=True)
    assert res["method"] == ("lora" if kind == "lora" else "prompt-tuning")
    est = lmtune.load_run(tiny_runs[kind], model=tiny_lm)
    base = evaluate_multiple_choice(path, model=tiny_lm, fmt="text", per_question=True)
    qs = read_questions(path)
    with est.attached():
        virtual = est._virtual_prefix(1)
        assert (virtual is not None) == (kind == "prompt")
        for q, row in zip(qs, res["questions"]):
            want = direct_logliks(tiny_lm, build_prompt(q, [], "text"), [" " + c for c in q.choices],
                                  virtual=virtual)
            np.testing.assert_allclose(row["loglik"], want, atol=1e-5)
    moved = max(abs(a - b) for r, s in zip(res["questions"], base["questions"]) for a, b in zip(r["loglik"], s["loglik"]))
    assert moved > 1e-4  # the adaptation changed the scores; the base model is left as it was
    again = evaluate_multiple_choice(path, model=tiny_lm, fmt="text", per_question=True)
    assert [r["loglik"] for r in again["questions"]] == [r["loglik"] for r in base["questions"]]


def test_run_that_leaves_the_model_unchanged_is_refused(tiny_lm, tiny_runs, tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", TINY_QUESTIONS)
    with pytest.raises(LmtuneError, match="closed-form run.*unchanged"):
        evaluate_multiple_choice(path, model=tiny_lm, run=tiny_runs["closed"])


# -- CLI -----------------------------------------------------------------------------------------------

def test_cli_bench_mmlu(capsys, tiny_model_dir, tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", TINY_QUESTIONS)
    assert main(["bench", "mmlu", "--model", str(tiny_model_dir), "--data", str(path), "--dev", str(path),
                 "--k-shot", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 6 and res["k_shot"] == 1 and res["format"] == "letters"
    assert res["overall"]["acc_norm"] == res["overall"]["acc"]  # letters: one character per choice
    assert 0 <= res["overall"]["acc"] <= 1 and set(res["subjects"]) == {"reviews", "text_questions"}

    assert main(["bench", "mmlu", "--model", str(tiny_model_dir), "--data", str(path), "--format", "text",
                 "--limit", "1"]) == 0
    out = capsys.readouterr().out
    assert "0-shot, text format, 2 questions" in out and "| reviews" in out and "all questions (micro)" in out

    bad = write_jsonl(tmp_path / "bad.jsonl", [TINY_QUESTIONS[0], {"question": "q", "choices": ["a"], "answer": 0}])
    assert main(["bench", "mmlu", "--model", str(tiny_model_dir), "--data", str(bad)]) == 2
    assert f"lmtune: error: {bad}:2, field 'choices'" in capsys.readouterr().err
    assert main(["bench", "mmlu", "--model", str(tiny_model_dir), "--data", str(path), "--k-shot", "2"]) == 2
    assert "need dev questions" in capsys.readouterr().err


# -- the real model ------------------------------------------------------------------------------------

@pytest.mark.real_model
def test_real_model_beats_chance_on_the_builtin_set(real_lm):
    # Scored by the choice texts: SmolLM2-135M is at chance with the letter format (checked by hand:
    # 0.26 zero-shot, 0.27 five-shot), as small models are on MMLU's letters, but well above it here.
    res = evaluate_multiple_choice("builtin:mcqa:test", model=real_lm, fmt="text", batch_size=16)
    o = res["overall"]
    assert res["n"] == 78 and o["chance"] == 0.25
    assert o["acc"] - 2 * o["acc_stderr"] > o["chance"]
    assert o["acc"] < 0.95  # not at ceiling: the set still separates models

"""Generation tasks: record layouts, completion-only targets, packing, multi-task mixtures, training."""

import json

import numpy as np
import pytest
import torch

import lmtune
from lmtune import cli
from lmtune.data import Dataset
from lmtune.errors import DataError, LmtuneError
from lmtune.instruct import GenerationTask, end_token_ids
from lmtune.lm_loss import layout, pack_rows, per_item_losses, position_ids
from lmtune.mixture import parse_mixture

from _exactness import assert_same_values_and_gradients

RECORDS = [
    {"instruction": "is this review positive", "input": "the text was great", "output": "yes", "task": "a"},
    {"instruction": "is this review positive", "output": "no maybe", "task": "b"},
    {"prompt": "is this a question", "completion": "yes the answer is yes"},
    {"messages": [{"role": "user", "content": "is this review positive"}, {"role": "assistant", "content": "maybe"},
                  {"role": "user", "content": "is this a question"}, {"role": "assistant", "content": "no"}]},
]


def _targets_text(tok, seq):
    return tok.decode([t for t, m in zip(seq.ids, seq.targets) if m])


def test_chat_targets_are_the_answers_and_their_end_token(tiny_lm):
    tok = tiny_lm.tokenizer
    task = GenerationTask()
    ds = Dataset.from_records(RECORDS)
    seqs = task.encode(tok, ds)
    end = tok.convert_tokens_to_ids("<|end|>")
    assert _targets_text(tok, seqs[0]) == "yes <|end|>"
    assert seqs[0].ids[-1] == end and seqs[0].targets[-1]
    # every target is after the assistant opening; nothing of the prompt is a target
    first = seqs[0].targets.index(True)
    assert tok.convert_ids_to_tokens(seqs[0].ids[first - 1]) == "<|assistant|>"
    assert not any(seqs[0].targets[:first])
    # multi-turn: both assistant turns are targets, the user turn between them is not
    assert _targets_text(tok, seqs[3]) == "maybe <|end|> no <|end|>"
    assert seqs[0].task == "a" and seqs[2].task == ""


def test_plain_layout_appends_eos_even_when_pad_is_eos(tiny_lm):
    """The EOS/pad trap: masking by token value would drop the EOS when pad == EOS."""
    tok = tiny_lm.tokenizer
    saved = tok.pad_token
    tok.pad_token = tok.eos_token
    try:
        seq, _ = GenerationTask(chat=False).sequence(tok, RECORDS[0], ("<memory>", 1))
    finally:
        tok.pad_token = saved
    assert seq.ids[-1] == tok.eos_token_id and seq.targets[-1]
    assert _targets_text(tok, seq) == "yes </s>"
    assert "instruction : is this review positive" in tok.decode(seq.ids)


def test_prompt_matches_the_training_prefix(tiny_lm):
    tok = tiny_lm.tokenizer
    task = GenerationTask()
    for i, rec in enumerate(RECORDS):
        seq, _ = task.sequence(tok, rec, ("<memory>", i + 1))
        prompt = task.prompt(tok, rec, ("<memory>", i + 1))
        last = len(seq.targets) - seq.targets[::-1].index(False)  # start of the final answer
        assert prompt.ids == seq.ids[:last]
    assert task.prompt(tok, RECORDS[3], ("x", 1)).references == ["no"]


def test_text_records_are_language_modelling(tiny_lm):
    seq, _ = GenerationTask().sequence(tiny_lm.tokenizer, {"text": "the review is positive"}, ("x", 1))
    assert all(seq.targets) and len(seq.ids) == 4
    with pytest.raises(DataError, match="no prompt"):
        GenerationTask().prompt(tiny_lm.tokenizer, {"text": "a"}, ("x", 1))


@pytest.mark.parametrize("record, field", [
    ({"instruction": "a"}, None),
    ({"instruction": "a", "output": ""}, "output"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0]"),
    ({"messages": []}, "messages"),
    ({"foo": "bar"}, None),
])
def test_bad_records_name_line_and_field(tiny_lm, record, field):
    with pytest.raises(DataError) as e:
        GenerationTask().sequence(tiny_lm.tokenizer, record, ("data.jsonl", 7))
    assert "data.jsonl" in str(e.value) and "7" in str(e.value)
    if field:
        assert field in str(e.value)


def test_long_records_lose_context_from_the_left_never_the_answer(tiny_lm):
    tok = tiny_lm.tokenizer
    rec = {"instruction": " ".join(["review"] * 40), "output": "yes"}
    seq, cut = GenerationTask(max_length=12).sequence(tok, rec, ("x", 1))
    assert cut and len(seq.ids) == 12 and _targets_text(tok, seq) == "yes <|end|>"
    with pytest.raises(DataError, match="answer alone"):
        GenerationTask(max_length=8).sequence(tok, {"instruction": "a", "output": " ".join(["yes"] * 20)}, ("x", 1))


def test_pack_rows_first_fit_decreasing():
    rows = pack_rows([5, 3, 2, 4, 1])
    assert sorted(i for r in rows for i in r) == [0, 1, 2, 3, 4]
    assert all(sum([5, 3, 2, 4, 1][i] for i in r) <= 5 for r in rows)
    assert len(rows) == 3
    lay, _ = layout([3, 2, 1], pack=True)
    assert lay.n_rows == 2 and position_ids(lay, [3, 2, 1]).tolist() == [[0, 1, 2], [0, 1, 0]]


def _direct_losses(lm, seqs):
    """Each record alone through the full model: mean NLL of its target tokens (the reference)."""
    out = []
    for s in seqs:
        with torch.no_grad():
            logits = lm.model(torch.tensor([s.ids], device=lm.device)).logits[0]
        logp = torch.log_softmax(logits.float(), -1)
        terms = [-logp[j - 1, s.ids[j]] for j in range(1, len(s.ids)) if s.targets[j]]
        out.append(float(torch.stack(terms).mean()))
    return np.array(out)


def test_packed_and_padded_losses_equal_per_record_forward(tiny_lm):
    task = GenerationTask()
    short = [{"prompt": "yes", "completion": "no"}, {"prompt": "maybe", "completion": "yes"}]
    seqs = task.encode(tiny_lm.tokenizer, Dataset.from_records(RECORDS + short * 2))
    ref = _direct_losses(tiny_lm, seqs)
    for pack in (False, True):
        est = lmtune.LoraClassifier(tiny_lm, task, pack=pack)
        with torch.no_grad():
            got = est._completion_losses(tiny_lm, [s.ids for s in seqs], [s.targets for s in seqs]).cpu().numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    lay, _ = layout([len(s.ids) for s in seqs], pack=True)
    assert lay.n_rows < len(seqs)  # packing did put several records in a row


def test_per_item_losses_skip_the_first_token():
    head = torch.nn.Linear(2, 3, bias=False)
    lay, _ = layout([2], pack=False)
    h = torch.randn(1, 2, 2)
    loss = per_item_losses(h, head, lay, [[0, 1]], [[True, True]])
    expected = torch.nn.functional.cross_entropy(head(h[0, :1]), torch.tensor([1]))
    assert torch.allclose(loss, expected.reshape(1))


def test_mixture_weights_and_tags(tmp_path):
    a = tmp_path / "a.jsonl"
    b = tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"prompt": "p", "completion": f"c{i}"}) + "\n" for i in range(10)))
    b.write_text("".join(json.dumps({"prompt": "p", "completion": f"d{i}"}) + "\n" for i in range(2)))
    mix = parse_mixture(f"{a}:1,{b}:3")
    order = mix.order(seed=0)
    desc = mix.describe(order)
    assert len(order) == 12 and [d["per_epoch"] for d in desc] == [3, 9]
    assert [d["name"] for d in desc] == ["a", "b"]
    assert mix.order(seed=0) == order and mix.order(seed=1) != order
    # the small part is repeated, each record as evenly as possible
    assert sorted(np.bincount(np.array(order[3:]) - 10).tolist()) == [4, 5]
    prop = parse_mixture(f"{a},{b}")
    assert prop.order(0) == list(range(12))
    with pytest.raises(LmtuneError, match="every part"):
        parse_mixture(f"{a}:1,{b}")
    with pytest.raises(LmtuneError, match="positive"):
        parse_mixture(f"{a}:0")
    assert parse_mixture("builtin:instruct:train").parts[0].name == "instruct"


def test_generation_fit_lowers_the_loss_and_round_trips(tiny_lm, tmp_path):
    task = GenerationTask()
    ds = Dataset.from_records(RECORDS * 4)
    val = Dataset.from_records(RECORDS)
    est = lmtune.LoraClassifier(tiny_lm, task, epochs=4, lr=3e-2, batch_size=4, progress=False, val=val).fit(ds)
    hist = est.fit_info_["train"]["history"]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert set(est.fit_info_["per_task_train_loss"]) == {"a", "b", "data"}  # untagged: the part's name
    before = est.completion_nll(val)
    path = est.save(tmp_path / "run")
    card = json.loads((path / "card.json").read_text())
    assert card["task"]["type"] == "generation" and "labels" not in card
    back = lmtune.load_run(path, model=tiny_lm)
    assert isinstance(back.task, GenerationTask)
    assert back.completion_nll(val)["nll"] == pytest.approx(before["nll"], rel=1e-6)
    base = _direct_losses(tiny_lm, task.encode(tiny_lm.tokenizer, val)).mean()  # the model is left unchanged
    assert before["nll"] < base


@pytest.mark.parametrize("method", ["adapter", "last-layers", "prompt-tuning", "full"])
def test_every_gradient_method_trains_a_generation_task(tiny_lm, method):
    est = lmtune.methods.METHODS[method](tiny_lm, GenerationTask(), epochs=3, batch_size=4, lr=1e-2,
                                         progress=False).fit(Dataset.from_records(RECORDS * 2))
    hist = est.fit_info_["train"]["history"]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]


def test_cli_fit_generate(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    out = tmp_path / "run"
    rc = cli.main(["fit", "--task", "generate", "--method", "lora", "--model", str(tiny_model_dir), "--train",
                   f"{data}:1,{data}:1", "--out", str(out), "--epochs", "1", "--pack", "--json"])
    assert rc == 0
    card = json.loads(capsys.readouterr().out)
    assert card["training"]["packed"] and len(card["training"]["mixture"]) == 2
    rc = cli.main(["fit", "--task", "generate", "--method", "closed-form", "--model", str(tiny_model_dir),
                   "--train", str(data), "--out", str(tmp_path / "x")])
    assert rc == 2 and "gradient method" in capsys.readouterr().err
    rc = cli.main(["fit", "--task", "generate", "--method", "lora", "--model", str(tiny_model_dir), "--train",
                   str(data), "--out", str(tmp_path / "y"), "--label-words", "0=no,1=yes"])
    assert rc == 2 and "--label-words" in capsys.readouterr().err


def test_end_tokens(tiny_lm):
    tok = tiny_lm.tokenizer
    assert end_token_ids(tok) == {tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>")}


@pytest.mark.parametrize("method, kw", [("lora", {"dropout": 0.0}), ("prompt-tuning", {"virtual_tokens": 3})])
def test_shared_prefix_completion_losses_are_exact_in_value_and_gradient(tiny_lm, method, kw):
    from lmtune.features import common_prefix_length
    from lmtune.lm_loss import completion_losses

    # same prompt, answers that share their first words: the shared part must stop before the first target
    recs = [{"prompt": "is this review positive or negative", "completion": c}
            for c in ("yes it is", "yes it is not", "yes no", "yes maybe")]
    task = GenerationTask()
    seqs = task.encode(tiny_lm.tokenizer, Dataset.from_records(recs))
    ids, targets = [s.ids for s in seqs], [s.targets for s in seqs]
    first = min(t.index(True) for t in targets)
    assert common_prefix_length(ids) > first >= 5  # the common prefix runs into the answers
    est = lmtune.methods.METHODS[method](tiny_lm, task, epochs=1, max_steps=2, batch_size=4, lr=1e-2, progress=False,
                                         **kw).fit(Dataset.from_records(recs))
    assert_same_values_and_gradients(
        est, tiny_lm,
        lambda: completion_losses(tiny_lm, ids, targets, prefix=est._virtual_prefix, share_prefix=True),
        lambda: completion_losses(tiny_lm, ids, targets, prefix=est._virtual_prefix, share_prefix=False))

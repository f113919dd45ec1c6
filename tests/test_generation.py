"""Batched generation: parity with ``model.generate`` one prompt at a time, sampling, stops, streaming."""

import json

import numpy as np
import pytest
import torch

from conftest import TEST_DEVICE
from lmtune import generation as gen
from lmtune.errors import LmtuneError
from lmtune.generation import (GenerationOptions, generate, generate_jsonl, iter_generate, partial_path,
                               sample_from, top_k_filter, top_p_filter)

WORDS = ("the food was great and the service slow but i would come back for the soup maybe not "
         "review positive answer yes or no text question sentence").split()


@pytest.fixture(scope="module")
def lm(tiny_model_dir, tmp_path_factory):
    """The tiny Llama of conftest with an untied output layer and larger random weights.

    The shared tiny model (tied embeddings, weights of scale 0.02) mostly repeats its last prompt token
    whatever came before, so a wrong position or a cache mix-up would still give the right tokens; this
    one's answers depend on the whole context."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    import lmtune

    cfg = LlamaConfig.from_pretrained(tiny_model_dir)
    cfg.tie_word_embeddings, cfg.initializer_range = False, 0.1
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama-untied")
    LlamaForCausalLM(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return lmtune.load_model(str(folder), device=TEST_DEVICE)


@pytest.fixture(scope="module")
def prompts(lm):
    """Ten prompts of 1 to 27 tokens, in no particular length order."""
    rng = np.random.default_rng(0)
    tok = lm.tokenizer
    lengths = [5, 27, 1, 12, 3, 20, 8, 16, 2, 9]
    return [tok(" ".join(rng.choice(WORDS, n)), add_special_tokens=False)["input_ids"][:n] for n in lengths]


def hf_greedy(lm, prompt, max_new_tokens, eos):
    """The reference: transformers' own generate on one prompt, no padding."""
    with torch.inference_mode():
        out = lm.model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=list(eos),
                                pad_token_id=lm.tokenizer.pad_token_id)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def stops_early(lm, prompts):
    """End tokens that stop the prompts at different steps (the random model rarely emits its own EOS), so
    rows leave the batch at different times; with the references from ``model.generate``."""
    free = [hf_greedy(lm, p, 12, gen.end_ids(lm)) for p in prompts]
    eos = set(gen.end_ids(lm)) | {free[0][2], free[3][6], free[6][0]}
    refs = [hf_greedy(lm, p, 12, eos) for p in prompts]
    lengths = {len(r) for r in refs}
    assert len(lengths) >= 3 and 12 in lengths, refs  # the schedules below really see rows finish apart
    return tuple(sorted(eos)), refs


@pytest.mark.parametrize("schedule", ["refill", "drop", "mask"])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_greedy_batched_equals_generate_one_at_a_time(lm, prompts, stops_early, batch_size, schedule):
    eos, refs = stops_early
    out = generate(lm, prompts, max_new_tokens=12, eos_token_ids=eos, batch_size=batch_size, schedule=schedule)
    assert [g.token_ids for g in out] == refs
    assert [g.index for g in out] == list(range(len(prompts)))
    for g, ref, p in zip(out, refs, prompts):
        assert g.finish_reason == ("eos" if ref[-1] in eos else "length")
        assert g.new_tokens == len(ref) and g.prompt_tokens == len(p)
        assert g.text == lm.tokenizer.decode(ref, skip_special_tokens=True)


@pytest.mark.parametrize("batch_size", [3, 8])
def test_padded_prompt_pass_for_caches_that_cannot_merge(lm, prompts, stops_early, batch_size, monkeypatch):
    """Models with sliding-window caches run their prompts as one left-padded batch, finished rows masked."""
    eos, refs = stops_early
    monkeypatch.setattr(gen, "_mergeable", lambda model: False)
    out = generate(lm, prompts, max_new_tokens=12, eos_token_ids=eos, batch_size=batch_size)
    assert [g.token_ids for g in out] == refs
    prefix = torch.randn(3, lm.hidden_size, generator=torch.Generator().manual_seed(2)) * 0.5
    with_prefix = generate(lm, prompts, max_new_tokens=4, eos_token_ids=(lm.tokenizer.pad_token_id,),
                           batch_size=batch_size, prefix_embeds=prefix)
    assert [g.token_ids for g in with_prefix] == [_naive_greedy(lm, p, prefix, 4) for p in prompts]


def test_greedy_equals_generate_on_the_shared_tiny_model(tiny_lm, prompts):
    eos = gen.end_ids(tiny_lm)
    out = generate(tiny_lm, prompts, max_new_tokens=8, batch_size=3)
    assert [g.token_ids for g in out] == [hf_greedy(tiny_lm, p, 8, eos) for p in prompts]


def test_shared_prompt_prefix_runs_once_and_changes_nothing(lm, prompts, monkeypatch):
    tok = lm.tokenizer
    head = tok("<|user|> review : is this review positive ? answer yes or no", add_special_tokens=False)["input_ids"]
    with_head = [head + p for p in prompts]
    shared = []
    real = gen._Engine.share_prefix

    def spy(self, order):
        real(self, order)
        shared.append(self.shared[0] if self.shared else 0)

    monkeypatch.setattr(gen._Engine, "share_prefix", spy)
    eos = (tok.pad_token_id,)
    out = generate(lm, with_head, max_new_tokens=8, eos_token_ids=eos, batch_size=3)
    assert [g.token_ids for g in out] == [hf_greedy(lm, p, 8, eos) for p in with_head]
    prefix = torch.randn(2, lm.hidden_size, generator=torch.Generator().manual_seed(5)) * 0.5
    virtual = generate(lm, with_head, max_new_tokens=4, eos_token_ids=eos, batch_size=4, prefix_embeds=prefix)
    assert [g.token_ids for g in virtual] == [_naive_greedy(lm, p, prefix, 4) for p in with_head]
    assert shared == [len(head), len(head)]


def test_long_answers_outgrow_the_cache_buffer(lm, prompts):
    """More new tokens than the cache's spare room (64): the buffer is reallocated mid-answer."""
    eos = (lm.tokenizer.pad_token_id,)
    out = generate(lm, prompts[:3], max_new_tokens=150, eos_token_ids=eos, batch_size=1)
    assert [g.token_ids for g in out] == [hf_greedy(lm, p, 150, eos) for p in prompts[:3]]


def test_iterator_yields_each_row_when_it_finishes(lm, prompts, stops_early):
    eos, refs = stops_early
    order = [g.index for g in iter_generate(lm, prompts, max_new_tokens=12, eos_token_ids=eos,
                                            batch_size=len(prompts))]
    assert sorted(order) == list(range(len(prompts)))
    # one batch holds everything: rows come out by when they finished, the shortest answer first
    steps = [len(refs[i]) for i in order]
    assert steps == sorted(steps) and steps[0] < steps[-1]


def test_skip_leaves_out_done_prompts(lm, prompts):
    out = list(iter_generate(lm, prompts, max_new_tokens=3, skip={0, 4, 9}))
    assert sorted(g.index for g in out) == [1, 2, 3, 5, 6, 7, 8]


def _naive_greedy(lm, prompt, prefix, n):
    """Greedy decoding with the prefix embeddings before the prompt, recomputing everything each step."""
    emb = lm.model.get_input_embeddings()
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            x = torch.cat([prefix[None].to(lm.device), emb(torch.tensor([ids], device=lm.device))], dim=1)
            ids.append(int(lm.model(inputs_embeds=x, use_cache=False).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_virtual_prefix_is_placed_before_each_prompt(lm, prompts):
    torch.manual_seed(1)
    P, d = 4, lm.hidden_size
    prefix = torch.randn(P, d) * 0.5
    refs = [_naive_greedy(lm, p, prefix, 6) for p in prompts]
    eos = (lm.tokenizer.pad_token_id,)  # never generated: every row runs 6 tokens
    as_tensor = generate(lm, prompts, max_new_tokens=6, eos_token_ids=eos, batch_size=4, prefix_embeds=prefix)
    as_function = generate(lm, prompts, max_new_tokens=6, eos_token_ids=eos, batch_size=3,
                           prefix_embeds=lambda b: prefix.expand(b, -1, -1))
    assert [g.token_ids for g in as_tensor] == refs
    assert [g.token_ids for g in as_function] == refs
    plain = generate(lm, prompts, max_new_tokens=6, eos_token_ids=eos)
    assert [g.token_ids for g in plain] != refs  # the prefix changes the answers
    with pytest.raises(LmtuneError, match="prefix_embeds"):
        generate(lm, prompts, prefix_embeds=torch.zeros(2, P, d))


# -- sampling -------------------------------------------------------------------------------------------

def test_top_p_keeps_the_smallest_nucleus():
    p = torch.tensor([[0.15, 0.5, 0.05, 0.3]])  # sorted: 0.5 (1), 0.3 (3), 0.15 (0), 0.05 (2)
    kept = lambda q: set(torch.nonzero(top_p_filter(p, q)[0]).flatten().tolist())  # noqa: E731
    assert kept(0.4) == {1}
    assert kept(0.5) == {1}  # 0.5 already reaches it
    assert kept(0.51) == {1, 3}
    assert kept(0.8) == {1, 3}
    assert kept(0.81) == {1, 3, 0}
    assert kept(1.0) == {0, 1, 2, 3}
    assert kept(1e-9) == {1}  # the most likely token always stays
    out = top_p_filter(p, 0.81)
    assert torch.equal(out[0, [0, 1, 3]], p[0, [0, 1, 3]]) and out[0, 2] == 0  # kept mass is untouched


def test_top_k_keeps_ties_at_the_kth_probability():
    p = torch.tensor([[0.1, 0.4, 0.25, 0.25]])
    assert torch.nonzero(top_k_filter(p, 1)[0]).flatten().tolist() == [1]
    assert torch.nonzero(top_k_filter(p, 2)[0]).flatten().tolist() == [1, 2, 3]
    assert torch.equal(top_k_filter(p, 10), p)


def test_inverse_cdf_draw_skips_zero_probabilities_and_matches_frequencies():
    p = torch.tensor([[0.0, 0.5, 0.0, 0.5]])
    assert sample_from(p, torch.tensor([0.0])).item() == 1
    assert sample_from(p, torch.tensor([0.4999])).item() == 1
    assert sample_from(p, torch.tensor([0.5])).item() == 3
    assert sample_from(p * 3, torch.tensor([0.9999])).item() == 3  # unnormalised rows are fine
    q = torch.tensor([0.1, 0.6, 0.3])
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0))
    draws = sample_from(q.expand(len(u), -1), u)
    freq = torch.bincount(draws, minlength=3).float() / len(u)
    assert torch.allclose(freq, q, atol=0.015), freq


def test_sampling_is_reproducible_and_independent_of_batching(lm, prompts):
    opts = {"max_new_tokens": 8, "do_sample": True, "temperature": 1.5, "top_p": 0.9, "seed": 7}
    a = generate(lm, prompts, batch_size=4, **opts)
    b = generate(lm, prompts, batch_size=4, **opts)
    c = generate(lm, prompts, batch_size=1, schedule="drop", **opts)
    other = generate(lm, prompts, batch_size=4, **{**opts, "seed": 8})
    greedy = generate(lm, prompts, max_new_tokens=8)
    ids = lambda out: [g.token_ids for g in out]  # noqa: E731
    assert ids(a) == ids(b) == ids(c)
    assert ids(a) != ids(other)
    assert ids(a) != ids(greedy)


def test_vanishing_temperature_or_nucleus_is_greedy(lm, prompts):
    greedy = [g.token_ids for g in generate(lm, prompts, max_new_tokens=8)]
    cold = generate(lm, prompts, max_new_tokens=8, do_sample=True, temperature=1e-4, seed=3)
    narrow = generate(lm, prompts, max_new_tokens=8, do_sample=True, top_p=1e-6, seed=3)
    top1 = generate(lm, prompts, max_new_tokens=8, do_sample=True, top_k=1, temperature=2.0, seed=3)
    zero = generate(lm, prompts, max_new_tokens=8, do_sample=True, temperature=0.0, seed=3)
    for out in (cold, narrow, top1, zero):
        assert [g.token_ids for g in out] == greedy


# -- stopping -------------------------------------------------------------------------------------------

def test_stop_string_cuts_the_text_and_stops_the_row(lm, prompts):
    free = generate(lm, prompts, max_new_tokens=12, eos_token_ids=(0,))
    row = next(g for g in free if len(set(g.text.split())) >= 2)  # an answer with a second distinct word
    words = row.text.split()
    stop = next(w for w in words if w != words[0])
    out = generate(lm, prompts, max_new_tokens=12, eos_token_ids=(0,), stop=[stop, "no such text"])
    g = out[row.index]
    assert g.finish_reason == "stop"
    assert g.text == row.text[:row.text.index(stop)]
    assert stop not in g.text
    assert g.token_ids == row.token_ids[:len(g.token_ids)] and g.new_tokens < row.new_tokens
    # rows whose text never holds the stop string are unchanged
    for a, b in zip(out, free):
        if stop not in b.text:
            assert (a.token_ids, a.finish_reason) == (b.token_ids, "length")


def test_max_new_tokens_is_respected(lm, prompts):
    for n in (1, 5):
        out = generate(lm, prompts, max_new_tokens=n, eos_token_ids=(0,), batch_size=3)
        assert all(g.new_tokens == n and g.finish_reason == "length" for g in out)


def test_end_token_stops_the_row_with_reason_eos(lm, prompts):
    free = generate(lm, prompts[:1], max_new_tokens=12, eos_token_ids=(0,))[0]
    end = free.token_ids[3]
    first = free.token_ids.index(end)
    g = generate(lm, prompts[:1], max_new_tokens=12, eos_token_ids=(end,))[0]
    assert g.finish_reason == "eos" and g.token_ids == free.token_ids[:first + 1]


def test_default_end_tokens_include_the_chat_end_of_turn(tiny_lm):
    tok = tiny_lm.tokenizer
    assert set(gen.end_ids(tiny_lm)) == {tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>")}


def test_bad_input_is_refused_clearly(lm, prompts):
    vocab = lm.model.get_input_embeddings().num_embeddings
    with pytest.raises(LmtuneError, match="prompt 1 is empty"):
        generate(lm, [prompts[0], []])
    with pytest.raises(LmtuneError, match=rf"prompt 0: token ids must be integers in \[0, {vocab}\)"):
        generate(lm, [[1, vocab]])
    with pytest.raises(LmtuneError, match="exceed the model's 512 positions"):
        generate(lm, [prompts[0]], max_new_tokens=510)
    for bad, match in [({"top_p": 0}, "top_p"), ({"max_new_tokens": 0}, "max_new_tokens"),
                       ({"temperature": -1}, "temperature"), ({"schedule": "fast"}, "schedule"),
                       ({"stop": [""]}, "stop"), ({"top_k": 0}, "top_k"), ({"batch_size": 0}, "batch_size")]:
        with pytest.raises(LmtuneError, match=match):
            GenerationOptions(**bad)


def test_model_mode_is_restored(lm, prompts):
    lm.model.train()
    try:
        generate(lm, prompts[:2], max_new_tokens=2)
        assert lm.model.training
    finally:
        lm.model.eval()


# -- streaming to a file --------------------------------------------------------------------------------

def _lines(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_jsonl_lines_in_input_order_with_ids(lm, prompts, tmp_path):
    out = tmp_path / "answers.jsonl"
    ids = [f"rec{i + 2}" for i in range(len(prompts))]
    extra = [{"line": i + 2, "text": "not mine"} for i in range(len(prompts))]
    summary = generate_jsonl(lm, prompts, out, ids=ids, extra=extra, max_new_tokens=5, batch_size=3)
    rows = _lines(out)
    ref = generate(lm, prompts, max_new_tokens=5, batch_size=3)
    assert [r["index"] for r in rows] == list(range(len(prompts)))
    assert [r["id"] for r in rows] == ids and [r["line"] for r in rows] == [e["line"] for e in extra]
    assert [r["text"] for r in rows] == [g.text for g in ref]  # the result's fields win over extra's
    assert [r["token_ids"] for r in rows] == [g.token_ids for g in ref]
    assert list(rows[0])[:2] == ["id", "index"]
    assert summary["generated"] == len(prompts) and summary["resumed"] == 0
    assert summary["new_tokens"] == sum(g.new_tokens for g in ref)
    assert not partial_path(out).exists() and sorted(p.name for p in tmp_path.iterdir()) == ["answers.jsonl"]


class _Stop(Exception):
    pass


def _interrupted_after(k, monkeypatch):
    """Make generation stop (as Ctrl-C would) after ``k`` results."""
    real = gen.iter_generate

    def stopping(*args, **kwargs):
        for n, g in enumerate(real(*args, **kwargs)):
            if n == k:
                raise _Stop
            yield g

    monkeypatch.setattr(gen, "iter_generate", stopping)


def test_interrupted_run_keeps_its_lines_and_resume_finishes_it(lm, prompts, tmp_path, monkeypatch):
    out = tmp_path / "answers.jsonl"
    out.write_text("an earlier result\n")
    opts = {"max_new_tokens": 6, "do_sample": True, "seed": 3, "batch_size": 4}
    with monkeypatch.context() as m:
        _interrupted_after(4, m)
        with pytest.raises(_Stop):
            generate_jsonl(lm, prompts, out, **opts)
    assert out.read_text() == "an earlier result\n"  # the final file is only ever replaced whole
    part = _lines(partial_path(out))
    assert "lmtune_generation" in part[0] and len(part) == 1 + 4
    # a write cut off mid-line is dropped on resume, and that record generated again
    with open(partial_path(out), "a") as f:
        f.write('{"id": 9, "index": 9, "te')
    done = {r["index"] for r in part[1:]}
    seen = []
    real = gen.iter_generate

    def recording(*args, **kwargs):
        for g in real(*args, **kwargs):
            seen.append(g.index)
            yield g

    monkeypatch.setattr(gen, "iter_generate", recording)
    summary = generate_jsonl(lm, prompts, out, resume=True, **opts)
    assert summary["resumed"] == 4 and summary["generated"] == len(prompts) - 4
    assert sorted(seen) == sorted(set(range(len(prompts))) - done)
    monkeypatch.setattr(gen, "iter_generate", real)
    whole = tmp_path / "whole.jsonl"
    generate_jsonl(lm, prompts, whole, **opts)
    assert out.read_text() == whole.read_text()  # the resumed file is what one run writes
    assert not partial_path(out).exists()


def test_resume_refuses_a_partial_file_of_other_options(lm, prompts, tmp_path, monkeypatch):
    out = tmp_path / "answers.jsonl"
    with monkeypatch.context() as m:
        _interrupted_after(2, m)
        with pytest.raises(_Stop):
            generate_jsonl(lm, prompts, out, max_new_tokens=4)
    with pytest.raises(LmtuneError, match="other prompts, ids, options or model"):
        generate_jsonl(lm, prompts, out, max_new_tokens=5, resume=True)
    summary = generate_jsonl(lm, prompts, out, max_new_tokens=5)  # without resume: starts over
    assert summary["resumed"] == 0 and len(_lines(out)) == len(prompts)


# -- the real model -------------------------------------------------------------------------------------

@pytest.mark.real_model
def test_real_model_chat_answer_stops_at_end_of_turn_and_batching_is_exact(real_lm):
    tok = real_lm.tokenizer
    questions = ["What is the capital of France?", "Name a primary color.",
                 "Summarize: the meeting moved from Monday to Tuesday because the room was booked."]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                       tokenize=True)["input_ids"] for q in questions]
    out = generate(real_lm, prompts, max_new_tokens=24, batch_size=3)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    first = out[0]
    assert first.finish_reason == "eos" and first.token_ids[-1] == im_end
    assert first.text.strip() and "<|im_end|>" not in first.text and "Paris" in first.text
    eos = gen.end_ids(real_lm)
    assert im_end in eos
    assert [g.token_ids for g in out] == [hf_greedy(real_lm, p, 24, eos) for p in prompts]

"""The final decoder layer computed only at the read positions (lmtune.last_layer): exact, and engaged."""

from __future__ import annotations

import contextlib

import pytest
import torch

from lmtune.data import Dataset, open_data
from lmtune.methods import METHODS
from lmtune.methods.tuned import _checkpointing, backbone_of

from _exactness import assert_same_values_and_gradients, briefly_trained


@contextlib.contextmanager
def attention(lm, impl):
    old = lm.model.config._attn_implementation
    lm.model.config._attn_implementation = impl
    try:
        yield
    finally:
        lm.model.config._attn_implementation = old


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("how", ["plain", "slots", "row", "cache"])
def test_final_layer_at_the_read_positions_equals_the_full_layer(tiny_lm, impl, how):
    from lmtune.features import continue_shared_head
    from lmtune.last_layer import final_layer_at, supported

    bb = backbone_of(tiny_lm)
    assert supported(bb)
    d = bb.config.hidden_size
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([9, 6, 7])
    B, T = len(lengths), int(lengths.max())
    head0, rows0 = torch.randn(1, 5, d, generator=gen), torch.randn(B, T, d, generator=gen)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    read = lengths - 1

    def run(at):
        head, rows = head0.clone().requires_grad_(True), rows0.clone().requires_grad_(True)
        with final_layer_at(bb, read if at else None):
            if how == "plain":
                out = bb(inputs_embeds=rows, attention_mask=mask, use_cache=False).last_hidden_state
            else:
                out = continue_shared_head(bb, head, rows, mask, how=how)
        z = out[torch.arange(B), read]
        (z * torch.arange(1.0, 1.0 + z.numel()).view_as(z)).sum().backward()
        return out.detach(), z.detach(), rows.grad, head.grad

    with attention(tiny_lm, impl):
        (out_at, *at), (_, *full) = run(True), run(False)
    assert not hasattr(bb.layers[-1], "forward") or "forward" not in vars(bb.layers[-1])  # restored
    for a, b in zip(at, full):
        if b is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert float(out_at[1, 0].abs().sum()) == 0.0  # a position not read was not computed: the shortcut ran


@pytest.mark.parametrize("method, kw", [("lora", {"dropout": 0.0}), ("lora", {"dropout": 0.0, "layers": 1}),
                                        ("prompt-tuning", {"virtual_tokens": 3}), ("adapter", {}),
                                        ("full", {}), ("last-layers", {"layers": 1})])
@pytest.mark.parametrize("share", [True, False])
def test_classifier_forward_with_the_short_final_layer_is_exact(tiny_lm, method, kw, share):
    est, seqs, label_ids, start = briefly_trained(tiny_lm, method, kw)

    def run(last_only):
        lower = est._lower_cache(tiny_lm, seqs, start) if start else None
        return est._forward(tiny_lm, seqs, label_ids, lower, start, share_prefix=share, last_only=last_only)

    assert_same_values_and_gradients(est, tiny_lm, lambda: run(True), lambda: run(False))


@pytest.fixture(scope="module")
def small():
    tr = open_data("builtin:reviews:train")
    return Dataset(tr.records[:16], tr.lines[:16], tr.path)


def test_short_final_layer_under_activation_checkpointing(tiny_lm, small):
    from lmtune.tasks import ClassificationTask

    task = ClassificationTask("Review: {text}\nIs this review positive?", {"negative": "no", "positive": "yes"})
    est = METHODS["lora"](tiny_lm, task, epochs=1, max_steps=2, lr=1e-2, dropout=0.0, progress=False, cache=False,
                          seed=0).fit(small)
    seqs = task.encode(tiny_lm.tokenizer, small).input_ids[:5]
    label_ids = torch.tensor(task.label_token_ids(tiny_lm.tokenizer))

    def run(last_only):
        _checkpointing(tiny_lm.model, last_only)
        return est._forward(tiny_lm, seqs, label_ids, last_only=last_only)

    try:
        assert_same_values_and_gradients(est, tiny_lm, lambda: run(True), lambda: run(False))
    finally:
        _checkpointing(tiny_lm.model, False)

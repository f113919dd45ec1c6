"""Feature extraction: parity with the full model's logits, prefix sharing is exact, the disk cache."""

import contextlib

import numpy as np
import pytest
import torch

import lmtune
from lmtune import features
from lmtune.features import cached_extract, common_prefix_length, extract


def _reference(lm, prompts, label_ids):
    """One prompt at a time through the whole causal LM: the full-vocabulary logits at the last position."""
    Z, L = [], []
    with torch.no_grad():
        for ids in prompts:
            out = lm.model(input_ids=torch.tensor([ids], device=lm.device), output_hidden_states=True)
            Z.append(out.hidden_states[-1][0, -1].cpu().numpy())
            L.append(out.logits[0, -1, label_ids].cpu().numpy())
    return np.stack(Z), np.stack(L)


@pytest.fixture(scope="module")
def prompts(tiny_lm):
    from lmtune.tasks import ClassificationTask

    task = ClassificationTask("Read the review and answer the question. Review: {text}\nIs this review positive?",
                              "negative=no,positive=yes")
    ds = lmtune.load_builtin("reviews", "test").subset(range(23))
    return task.encode(tiny_lm.tokenizer, ds, labeled=False).input_ids, task.label_token_ids(tiny_lm.tokenizer)


@pytest.mark.parametrize("share_prefix", [True, False])
@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_extract_matches_full_model(tiny_lm, prompts, share_prefix, batch_size):
    ids, label_ids = prompts
    assert len({len(p) for p in ids}) > 5, "prompts of varied length exercise padding"
    f = extract(tiny_lm, ids, label_ids, batch_size=batch_size, share_prefix=share_prefix, progress=False)
    Z, L = _reference(tiny_lm, ids, label_ids)
    np.testing.assert_allclose(f.Z, Z, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(f.L, L, atol=1e-5, rtol=1e-4)


def test_shared_prefix_is_used_and_exact(tiny_lm, prompts, monkeypatch):
    ids, label_ids = prompts
    P = common_prefix_length(ids)
    assert P >= features.MIN_SHARED_PREFIX  # the chat marker and the instruction are shared
    seen = []
    real = features._prefix_cache
    monkeypatch.setattr(features, "_prefix_cache", lambda bb, prefix, dev: seen.append(len(prefix)) or real(bb, prefix, dev))
    extract(tiny_lm, ids, label_ids, batch_size=8, progress=False)
    assert seen == [P]


def test_common_prefix_length():
    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == 2
    # at least one token of each sequence is left outside the prefix
    assert common_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert common_prefix_length([[7], [7, 8]]) == 0
    assert common_prefix_length([]) == 0


def test_disk_cache_round_trip(tiny_lm, prompts, monkeypatch):
    ids, label_ids = prompts
    first = cached_extract(tiny_lm, ids, label_ids, progress=False)
    monkeypatch.setattr(features, "extract", lambda *a, **k: pytest.fail("the cache should have answered"))
    second = cached_extract(tiny_lm, ids, label_ids, progress=False)
    assert isinstance(second.Z, np.memmap), "cached features are read memory-mapped, not loaded whole"
    direct = extract(tiny_lm, ids, label_ids, progress=False)
    np.testing.assert_array_equal(first.Z, direct.Z)
    np.testing.assert_array_equal(first.Z, second.Z)
    np.testing.assert_array_equal(first.L, second.L)
    # another prompt or other label tokens are other keys
    assert features.feature_key(tiny_lm, ids[:-1], label_ids) != features.feature_key(tiny_lm, ids, label_ids)
    assert features.feature_key(tiny_lm, ids, label_ids[::-1]) != features.feature_key(tiny_lm, ids, label_ids)
    assert not list(features.feature_cache_path().glob(".tmp-*"))


@pytest.mark.parametrize("how", ["slots", "row", "cache"])
@pytest.mark.parametrize("part", ["all layers", "top layer", "checkpointed", "eager attention"])
def test_continue_shared_head_equals_full_rows_in_value_and_gradient(tiny_lm, how, part):
    """Every way of running a shared head once gives every row's final states, and the gradients with
    respect to the head and the rows' inputs, of running each row in full."""
    from lmtune.features import continue_shared_head
    from lmtune.methods.tuned import _checkpointing, backbone_of, layer_range

    bb = backbone_of(tiny_lm)
    d = bb.config.hidden_size
    gen = torch.Generator().manual_seed(0)
    H, lengths = 5, [9, 6, 7]
    B, T = len(lengths), max(lengths)
    head0 = torch.randn(1, H, d, generator=gen)
    rows0 = torch.randn(B, T, d, generator=gen)
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    weight = torch.randn(B, T, d, generator=gen) * mask[:, :, None]  # a loss on the real tokens only

    def run(shared):
        head, rows = head0.clone().requires_grad_(True), rows0.clone().requires_grad_(True)
        if shared:
            out = continue_shared_head(net, head, rows, mask, how=how)
        else:
            full = torch.cat([head.expand(B, -1, -1), rows], dim=1)
            full_mask = torch.cat([torch.ones(B, H, dtype=mask.dtype), mask], dim=1)
            out = net(inputs_embeds=full, attention_mask=full_mask, use_cache=False).last_hidden_state[:, H:]
        (out * weight).sum().backward()
        return out.detach() * mask[:, :, None], head.grad, rows.grad

    tiny_lm.model.train()  # no dropout in the tiny model; train mode is what checkpointing needs
    impl = tiny_lm.model.config._attn_implementation
    if part == "eager attention":  # the row way's 4D mask is additive there, boolean-free
        tiny_lm.model.config._attn_implementation = "eager"
    try:
        with (layer_range(tiny_lm, 1) if part == "top layer" else contextlib.nullcontext(bb)) as net:
            if part == "checkpointed":
                _checkpointing(tiny_lm.model, True)
            try:
                shared, plain = run(True), run(False)
            finally:
                _checkpointing(tiny_lm.model, False)
    finally:
        tiny_lm.model.eval()
        tiny_lm.model.config._attn_implementation = impl
    for a, b in zip(shared, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert shared[1].abs().sum() > 0  # the rows' loss reaches the head


@pytest.mark.parametrize("H, lengths", [(5, [9, 6, 7]), (6, [9, 8, 9]), (12, [3, 2, 3]), (3, [4, 4, 4]),
                                        (2, [1, 6, 2])])
def test_head_in_the_padding_fits_any_geometry(tiny_lm, H, lengths):
    """The slots way with the padding exactly filled, widened by 2 columns, a head longer than every row,
    no padding at all, and more padding than head: the rows' states and gradients of running them in full."""
    from lmtune.features import _slots_width, continue_shared_head
    from lmtune.methods.tuned import backbone_of

    bb = backbone_of(tiny_lm)
    d = bb.config.hidden_size
    gen = torch.Generator().manual_seed(3)
    B, T = len(lengths), max(lengths)
    head0, rows0 = torch.randn(1, H, d, generator=gen), torch.randn(B, T, d, generator=gen)
    mask = (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).long()
    weight = torch.randn(B, T, d, generator=gen) * mask[:, :, None]
    free = B * T - sum(lengths)
    assert _slots_width(mask, H) == T + max(0, -(-(H - free) // B))

    def run(shared):
        head, rows = head0.clone().requires_grad_(True), rows0.clone().requires_grad_(True)
        if shared:
            out = continue_shared_head(bb, head, rows, mask, how="slots")
        else:
            full = torch.cat([head.expand(B, -1, -1), rows], dim=1)
            full_mask = torch.cat([torch.ones(B, H, dtype=mask.dtype), mask], dim=1)
            out = bb(inputs_embeds=full, attention_mask=full_mask, use_cache=False).last_hidden_state[:, H:]
        assert out.shape == (B, T, d)
        (out * weight).sum().backward()
        return out.detach() * mask[:, :, None], head.grad, rows.grad

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_head_in_the_padding_with_left_padded_rows(tiny_lm):
    """Padding on the left is padding too: the head may sit there, and the rows still match."""
    from lmtune.features import continue_shared_head
    from lmtune.methods.tuned import backbone_of

    bb = backbone_of(tiny_lm)
    d = bb.config.hidden_size
    gen = torch.Generator().manual_seed(4)
    H, B, T = 4, 3, 6
    head0, rows0 = torch.randn(1, H, d, generator=gen), torch.randn(B, T, d, generator=gen)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    full = torch.cat([head0.expand(B, -1, -1), rows0], dim=1)
    full_mask = torch.cat([torch.ones(B, H, dtype=mask.dtype), mask], dim=1)
    with torch.no_grad():
        want = bb(inputs_embeds=full, attention_mask=full_mask, use_cache=False).last_hidden_state[:, H:]
        got = continue_shared_head(bb, head0, rows0, mask, how="slots")
    torch.testing.assert_close(got * mask[:, :, None], want * mask[:, :, None], atol=1e-5, rtol=1e-4)

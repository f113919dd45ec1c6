"""Leaner decoder blocks (lmtune.lean_blocks): the same numbers, fewer saved activations, restored after."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from lmtune.lean_blocks import GQA_SDPA, SwiGLU, gqa_sdpa_forward, lean_blocks
from lmtune.methods.tuned import _checkpointing, backbone_of

from _exactness import assert_same_values_and_gradients, briefly_trained


def test_swiglu_matches_autograd_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    g0, u0, grad = (torch.randn(3, 5, 7, generator=gen) for _ in range(3))
    outs = []
    for fn in (lambda g, u: F.silu(g) * u, SwiGLU.apply):
        g, u = g0.clone().requires_grad_(True), u0.clone().requires_grad_(True)
        y = fn(g, u)
        y.backward(grad)
        outs.append((y.detach(), g.grad, u.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_swiglu_gradcheck_and_one_sided_gradients():
    g = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    u = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SwiGLU.apply, (g, u))
    (du,) = torch.autograd.grad(SwiGLU.apply(g.detach(), u).sum(), (u,))
    torch.testing.assert_close(du, F.silu(g.detach()))


def test_swiglu_keeps_two_tensors_where_autograd_keeps_three():
    def saved_bytes(fn):
        total = []

        def pack(t):
            total.append(t.untyped_storage().nbytes())
            return t

        g, u = torch.randn(8, 64, requires_grad=True), torch.randn(8, 64, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(g, u)
        return sum(total)

    assert saved_bytes(SwiGLU.apply) == 2 * 8 * 64 * 4
    assert saved_bytes(lambda g, u: F.silu(g) * u) == 3 * 8 * 64 * 4


class _Attn(torch.nn.Module):
    num_key_value_groups = 3
    is_causal = True
    training = False


@pytest.mark.parametrize("masked", [True, False])
def test_grouped_query_sdpa_equals_transformers_sdpa(masked):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    gen = torch.Generator().manual_seed(0)
    B, H, Hk, T, D = 2, 6, 2, 5, 8
    q0, k0, v0 = torch.randn(B, H, T, D, generator=gen), torch.randn(B, Hk, T, D, generator=gen), \
        torch.randn(B, Hk, T, D, generator=gen)
    mask = None
    if masked:  # causal over the valid keys of right-padded rows, additive as transformers builds it
        valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
        allowed = torch.ones(T, T, dtype=torch.bool).tril()[None] & valid[:, None, :]
        mask = torch.zeros(B, 1, T, T).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    mod = _Attn()
    mod.num_key_value_groups = H // Hk
    results = []
    for fn in (sdpa_attention_forward, gqa_sdpa_forward):
        q, k, v = (x.clone().requires_grad_(True) for x in (q0, k0, v0))
        out, _ = fn(mod, q, k, v, mask, scaling=D ** -0.5)
        out.backward(torch.arange(out.numel(), dtype=out.dtype).view_as(out) / out.numel())
        results.append((out.detach(), q.grad, k.grad, v.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def _saved_activation_bytes(bb, run) -> int:
    params = {p.untyped_storage().data_ptr() for p in bb.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


@pytest.mark.parametrize("how", ["plain", "slots", "row", "cache"])
def test_lean_blocks_are_exact_save_less_and_restore_the_model(tiny_lm, how):
    from lmtune.features import continue_shared_head

    bb = backbone_of(tiny_lm)
    cfg = bb.config
    d, inter = cfg.hidden_size, cfg.intermediate_size
    gen = torch.Generator().manual_seed(2)
    lengths = torch.tensor([8, 5, 7])
    B, T = len(lengths), int(lengths.max())
    head0, rows0 = torch.randn(1, 4, d, generator=gen), torch.randn(B, T, d, generator=gen)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    impl = cfg._attn_implementation
    assert impl == "sdpa" and cfg.num_key_value_heads < cfg.num_attention_heads  # the grouped-query case

    def forward(lean):
        head, rows = head0.clone().requires_grad_(True), rows0.clone().requires_grad_(True)
        with lean_blocks(bb) if lean else contextlib.nullcontext():
            if lean:
                assert cfg._attn_implementation == GQA_SDPA
            if how == "plain":
                out = bb(inputs_embeds=rows, attention_mask=mask, use_cache=False).last_hidden_state
            else:
                out = continue_shared_head(bb, head, rows, mask, how=how)
        return out, head, rows

    def run(lean):
        out, head, rows = forward(lean)
        (out * torch.arange(1.0, 1.0 + out.numel()).view_as(out)).sum().backward()
        return out.detach(), rows.grad, head.grad

    bb.train()
    try:
        lean, plain = run(True), run(False)
        saved = {x: _saved_activation_bytes(bb, lambda: forward(x)) for x in (True, False)}
    finally:
        bb.eval()
    for a, b in zip(lean, plain):
        if b is not None:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert cfg._attn_implementation == impl
    assert all("forward" not in vars(layer.mlp) for layer in bb.layers)
    # at least each layer's SiLU output (tokens x intermediate float32) is no longer kept
    tokens = B * T if how != "row" else (B + 1) * T
    assert saved[False] - saved[True] >= len(bb.layers) * tokens * inter * 4


def test_lean_blocks_restore_the_model_after_an_error(tiny_lm):
    bb = backbone_of(tiny_lm)
    with pytest.raises(RuntimeError, match="boom"):
        with lean_blocks(bb):
            raise RuntimeError("boom")
    assert bb.config._attn_implementation == "sdpa"
    assert all("forward" not in vars(layer.mlp) for layer in bb.layers)


def test_lean_blocks_stand_aside_under_activation_checkpointing(tiny_lm):
    bb = backbone_of(tiny_lm)
    _checkpointing(tiny_lm.model, True)
    bb.train()
    try:
        with lean_blocks(bb):
            assert bb.config._attn_implementation == "sdpa"
            assert all("forward" not in vars(layer.mlp) for layer in bb.layers)
    finally:
        bb.eval()
        _checkpointing(tiny_lm.model, False)


@pytest.mark.parametrize("method, kw", [("lora", {"dropout": 0.0, "target": "q_proj,v_proj,gate_proj,down_proj"}),
                                        ("lora", {"dropout": 0.0, "layers": 1}),
                                        ("prompt-tuning", {"virtual_tokens": 3}), ("adapter", {}),
                                        ("full", {}), ("norm-tuning", {})])
@pytest.mark.parametrize("share", [True, False])
def test_classifier_forward_with_lean_blocks_is_exact(tiny_lm, monkeypatch, method, kw, share):
    import lmtune.methods.tuned as tuned
    est, seqs, label_ids, start = briefly_trained(tiny_lm, method, kw)
    used = []

    def counting(bb):
        used.append(bb.config.model_type)
        return lean_blocks(bb)

    def run(lean):
        monkeypatch.setattr(tuned, "lean_blocks", counting if lean else (lambda bb: contextlib.nullcontext()))
        lower = est._lower_cache(tiny_lm, seqs, start) if start else None
        return est._forward(tiny_lm, seqs, label_ids, lower, start, share_prefix=share)

    assert_same_values_and_gradients(est, tiny_lm, lambda: run(True), lambda: run(False), atol=1e-6, rtol=1e-5)
    assert used  # the lean path was the one compared

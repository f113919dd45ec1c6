"""LoRA's branch as one function (lmtune.lean_lora): PEFT's values and gradients, dropout's distribution,
fewer saved bytes, and PEFT's own path wherever the plain case does not hold."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lmtune.lean_lora import LoraBranch, _plain_case, dropped_positions, is_lean, lean_lora


# ---------------------------------------------------------------------------------------------------
# The sampler of dropped positions.

def test_dropped_positions_are_sorted_distinct_in_range_and_seeded():
    gen = torch.Generator().manual_seed(3)
    pos = dropped_positions(100_000, 0.05, gen)
    assert pos.dtype == torch.long and pos.ndim == 1
    assert bool((pos[1:] > pos[:-1]).all()) and int(pos[0]) >= 0 and int(pos[-1]) < 100_000
    again = dropped_positions(100_000, 0.05, torch.Generator().manual_seed(3))
    assert torch.equal(pos, again)
    assert not torch.equal(pos[:50], dropped_positions(100_000, 0.05, torch.Generator().manual_seed(4))[:50])


@pytest.mark.parametrize("p", [0.05, 0.3, 0.7])
def test_dropped_positions_are_iid_bernoulli(p):
    n = 400_000
    pos = dropped_positions(n, p, torch.Generator().manual_seed(0))
    k = pos.numel()
    sd = math.sqrt(n * p * (1 - p))
    assert abs(k - n * p) < 5 * sd  # the count is Binomial(n, p)
    # Every stretch of the sequence is covered alike (no truncation at the end of a draw).
    tenth = torch.bincount(pos // (n // 10), minlength=10).double()
    assert float((tenth - n * p / 10).abs().max()) < 5 * math.sqrt(n / 10 * p * (1 - p))
    # Gaps are geometric: P(gap = g) = p (1 - p)^(g - 1); chi-square over the first few values and the tail.
    gaps = torch.diff(pos).numpy()
    m = len(gaps)
    cells = [int(np.sum(gaps == g)) for g in range(1, 6)] + [int(np.sum(gaps >= 6))]
    probs = [p * (1 - p) ** (g - 1) for g in range(1, 6)] + [(1 - p) ** 5]
    chi2 = sum((c - m * q) ** 2 / (m * q) for c, q in zip(cells, probs))
    assert chi2 < 30  # 5 degrees of freedom: p-value about 1e-5
    # Neighbours are independent: P(both kept) = (1 - p)^2.
    keep = torch.ones(n, dtype=torch.bool)
    keep[pos] = False
    both = (keep[1:] & keep[:-1]).double().mean().item()
    assert abs(both - (1 - p) ** 2) < 5 * math.sqrt((1 - p) ** 2 / n)


def test_dropped_positions_draw_again_when_the_first_draw_falls_short():
    n, p = 50_000, 0.1
    pos = dropped_positions(n, p, torch.Generator().manual_seed(1), first_chunk=100)
    assert bool((pos[1:] > pos[:-1]).all()) and int(pos[-1]) < n
    assert abs(pos.numel() - n * p) < 5 * math.sqrt(n * p * (1 - p))
    assert int(pos[-1]) > n - 200  # reached the end, not only the first 100 gaps


def test_dropped_positions_edge_cases():
    assert dropped_positions(0, 0.5).numel() == 0
    assert dropped_positions(1000, 0.0).numel() == 0
    with pytest.raises(ValueError, match="dropout probability"):
        dropped_positions(10, 1.0)


# ---------------------------------------------------------------------------------------------------
# The function.

def _reference(x, A, B, keep, keep_scale, scaling):
    xd = x * keep * keep_scale if keep is not None else x
    return (xd @ A.T) @ B.T * scaling


@pytest.mark.parametrize("dropout", [True, False])
def test_branch_matches_the_module_path_with_the_same_dropped_positions(dropout):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 11, 20, generator=gen)
    A0, B0 = torch.randn(4, 20, generator=gen), torch.randn(16, 4, generator=gen)
    grad = torch.randn(3, 11, 16, generator=gen)
    p = 0.2
    pos = dropped_positions(x0.numel(), p, gen) if dropout else None
    keep = None
    if dropout:
        keep = torch.ones(x0.numel(), dtype=torch.bool)
        keep[pos] = False
        keep = keep.view(x0.shape)
    outs = []
    for fn in (lambda x, A, B: LoraBranch.apply(x, A, B, pos, 1 / (1 - p) if dropout else 1.0, 2.0),
               lambda x, A, B: _reference(x, A, B, keep, 1 / (1 - p), 2.0)):
        x, A, B = (t.clone().requires_grad_(True) for t in (x0, A0, B0))
        y = fn(x, A, B)
        y.backward(grad)
        outs.append((y.detach(), x.grad, A.grad, B.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if dropout:
        assert bool((outs[0][1].reshape(-1)[pos] == 0).all())  # no gradient through a dropped element


def test_branch_takes_a_non_contiguous_input():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(20, 12, generator=gen).t()  # (12, 20), strides (1, 12)
    A, B = torch.randn(3, 20, generator=gen), torch.randn(5, 3, generator=gen)
    pos = dropped_positions(x.numel(), 0.25, gen)
    keep = torch.ones(x.numel(), dtype=torch.bool)
    keep[pos] = False
    torch.testing.assert_close(LoraBranch.apply(x, A, B, pos, 1 / 0.75, 2.0),
                               _reference(x, A, B, keep.view(x.shape), 1 / 0.75, 2.0))


def test_branch_gradcheck():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    A = torch.randn(3, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    B = torch.randn(7, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    pos = dropped_positions(x.numel(), 0.3, gen)
    assert torch.autograd.gradcheck(lambda x, A, B: LoraBranch.apply(x, A, B, pos, 1 / 0.7, 0.5), (x, A, B))
    assert torch.autograd.gradcheck(lambda x, A, B: LoraBranch.apply(x, A, B, None, 1.0, 0.5), (x, A, B))
    # Only what is asked for: no input gradient when the input does not need one.
    (gA,) = torch.autograd.grad(LoraBranch.apply(x.detach(), A, B, pos, 1 / 0.7, 0.5).sum(), (A,))
    assert gA.shape == A.shape


# ---------------------------------------------------------------------------------------------------
# On a PEFT model.

def _peft(tiny_lm, dropout=0.1, **config):
    from peft import LoraConfig, get_peft_model

    from lmtune.methods.peft_methods import quiet_peft, use_fast_dropout

    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj"], **config)
    with quiet_peft():
        pm = get_peft_model(tiny_lm.model, cfg)
    use_fast_dropout(pm)
    for name, p in pm.named_parameters():  # B != 0, so the branch shows in the output
        if "lora_B" in name:
            with torch.no_grad():
                p.normal_(0, 0.1)
    return pm


@pytest.fixture
def lora_model(tiny_lm):
    if tiny_lm.device.type != "cpu":
        pytest.skip("the one-function branch is CPU-only")
    pm = _peft(tiny_lm)
    try:
        yield pm
    finally:
        pm.unload()


def _layers(pm):
    from peft.tuners.lora.layer import Linear

    return [m for m in pm.modules() if type(m) is Linear]


def test_lean_layers_match_peft_with_the_same_draw(lora_model):
    layer = _layers(lora_model)[0]
    d_in = layer.in_features
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 9, d_in, generator=gen)
    grad = torch.randn(2, 9, layer.out_features, generator=gen)
    lora_model.train()
    p = layer.lora_dropout["default"].p
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight

    assert lean_lora(lora_model) == len(_layers(lora_model)) > 0 and is_lean(layer)
    x = x0.clone().requires_grad_(True)
    torch.manual_seed(5)
    y = layer(x)
    y.backward(grad)
    lean = (y.detach(), x.grad.clone(), A.grad.clone(), B.grad.clone())
    A.grad = B.grad = None

    torch.manual_seed(5)  # the same dropped positions, applied the way PEFT's modules would
    pos = dropped_positions(x0.numel(), p)
    keep = torch.ones(x0.numel(), dtype=torch.bool)
    keep[pos] = False
    x = x0.clone().requires_grad_(True)
    y = layer.base_layer(x) + _reference(x, A, B, keep.view(x0.shape), 1 / (1 - p), layer.scaling["default"])
    y.backward(grad)
    for a, b in zip(lean, (y.detach(), x.grad, A.grad, B.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    A.grad = B.grad = None

    # In eval mode there is no dropout: PEFT's own forward gives the same output.
    lora_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x0), type(layer).forward(layer, x0), rtol=1e-5, atol=1e-6)


def test_lean_layers_keep_fewer_bytes_for_the_backward(lora_model):
    """q_proj and v_proj read the same input: kept once, with the dropped positions, instead of two dropped
    copies and two masks."""
    attn = next(m for m in lora_model.modules() if hasattr(m, "q_proj") and hasattr(m, "v_proj"))
    x = torch.randn(4, 16, attn.q_proj.in_features, requires_grad=True)
    lora_model.train()

    def saved_bytes():
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            attn.q_proj(x).sum() + attn.v_proj(x).sum()
        params = {p.untyped_storage().data_ptr() for p in lora_model.parameters()}
        return sum(n for ptr, n in seen.items() if ptr not in params)

    before = saved_bytes()
    lean_lora(lora_model)
    after = saved_bytes()
    # PEFT: two float copies and two boolean masks of x; here: x once and about 2 p of its elements as int64.
    assert before >= x.numel() * (2 * 4 + 2)
    assert after <= x.numel() * (4 + 2 * 8 * 0.1 * 1.5) + 64 * 1024


def test_lean_layers_fall_back_to_peft_outside_the_plain_case(lora_model):
    layer = _layers(lora_model)[0]
    lean_lora(lora_model)
    x = torch.randn(2, 3, layer.in_features)
    lora_model.train()
    assert _plain_case(layer, x, (), {}) is not None
    assert _plain_case(layer, x.double(), (), {}) is None  # another dtype than the factors'
    assert _plain_case(layer, x, (), {"adapter_names": ["default"]}) is None
    seen = []
    handle = layer.lora_A["default"].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    try:
        assert _plain_case(layer, x, (), {}) is None
        layer(x)
        assert seen  # the hook (lmtune's Laplace pass uses one) saw PEFT's own lora_A call
    finally:
        handle.remove()
    with lora_model.disable_adapter():
        assert _plain_case(layer, x, (), {}) is None
        lora_model.eval()
        with torch.no_grad():
            torch.testing.assert_close(layer(x), layer.base_layer(x))


def test_dora_keeps_peft_forward(tiny_lm):
    if tiny_lm.device.type != "cpu":
        pytest.skip("the one-function branch is CPU-only")
    pm = _peft(tiny_lm, use_dora=True)
    try:
        lean_lora(pm)
        layer = _layers(pm)[0]
        assert _plain_case(layer, torch.randn(1, 2, layer.in_features), (), {}) is None
    finally:
        pm.unload()


def test_lora_training_uses_the_lean_branch_and_still_learns(tiny_lm, review_task):
    from lmtune.data import Dataset, open_data
    from lmtune.methods import METHODS

    if tiny_lm.device.type != "cpu":
        pytest.skip("the one-function branch is CPU-only")
    calls = []
    apply = LoraBranch.apply

    def counting(*a):
        calls.append(a[3] is not None)
        return apply(*a)

    LoraBranch.apply = counting
    try:
        est = METHODS["lora"](tiny_lm, review_task, epochs=2, progress=False, cache=False, dropout=0.1, lr=1e-2)
        tr = open_data("builtin:reviews:train")
        est.fit(Dataset(tr.records[:32], tr.lines[:32], tr.path))
    finally:
        LoraBranch.apply = apply
    assert calls and any(calls)  # training steps drew dropout positions
    hist = est.fit_info_["train"]["history"]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]

"""Test helper: two computations of the same thing must agree in value and in every trainable gradient."""

from __future__ import annotations

import torch


def assert_same_values_and_gradients(est, lm, run_a, run_b, atol=1e-5, rtol=1e-4):
    """Run ``run_a()`` and ``run_b()`` (each returning an output tensor) in train mode with ``est``'s state
    attached; assert their outputs, and the gradients of a fixed weighted sum of them with respect to every
    trainable parameter, agree; and that some gradient is non-zero (so the comparison says something)."""
    results = []
    with est.attached(train=True) as params:
        lm.model.train()
        try:
            for run in (run_a, run_b):
                for p in params.values():
                    p.grad = None
                out = run()
                (out * torch.arange(1.0, 1.0 + out.numel()).view_as(out)).sum().backward()
                results.append((out.detach(), {n: p.grad.clone() for n, p in params.items()}))
        finally:
            lm.model.eval()
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], atol=atol, rtol=rtol, msg=name)
    assert any(g.abs().sum() > 0 for g in ga.values())

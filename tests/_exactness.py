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


def briefly_trained(lm, method: str, kw: dict, n_prompts: int = 6):
    """A ``method`` estimator trained 2 steps on 16 built-in reviews, under a task whose prompts share a long
    prefix; returns it with its first ``n_prompts`` prompts' token ids, the label-token ids and the layer
    below which it is frozen (for comparing two ways of running its forward)."""
    from lmtune.data import Dataset, open_data
    from lmtune.methods import METHODS
    from lmtune.tasks import ClassificationTask

    tr = open_data("builtin:reviews:train")
    small = Dataset(tr.records[:16], tr.lines[:16], tr.path)
    task = ClassificationTask("Read the product review below and judge its sentiment carefully.\n"
                              "Review: {text}\nIs this review positive? Answer yes or no.",
                              {"negative": "no", "positive": "yes"})
    est = METHODS[method](lm, task, epochs=1, max_steps=2, lr=1e-2, progress=False, cache=False, seed=0,
                          **kw).fit(small)
    seqs = task.encode(lm.tokenizer, small).input_ids[:n_prompts]
    return est, seqs, torch.tensor(task.label_token_ids(lm.tokenizer)), est._frozen_below(lm)

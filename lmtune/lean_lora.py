"""LoRA's low-rank branch as one autograd function, for training on the CPU.

PEFT computes a LoRA layer's update as ``lora_B(lora_A(dropout(x))) * scaling``: dropout, two linear
modules and a multiply, each an autograd node with its own saved tensors. On the CPU that path costs far
more than its arithmetic, which is 2r/576 = 3% of the frozen projection's beside it at r = 8. A forward and
backward of one q_proj's branch on 909 tokens of SmolLM2-135M (2 threads, micro-benchmark) took 11 ms by
PEFT's path with lmtune's ``FastDropout`` and 6.5 ms by this function; the projection's own forward
matmul takes 6 ms. Where the time went:

* **The dropout mask.** Drawing one uniform per element is serial in torch's CPU generator (3.5 ms for
  909 x 576 floats), and the float-by-bool mask multiply runs in the forward and again in the backward.
  Here the *dropped positions* are drawn instead (:func:`dropped_positions`): the gaps between successive
  dropped elements of an i.i.d. Bernoulli(p) sequence are geometric, so ``p n`` float64 uniforms give
  them exactly (``gap = 1 + floor(log(1 - u) / log(1 - p))``). At LoRA's usual p = 0.05 that is 20 times
  fewer draws, and applying the mask is an ``index_fill_`` of ``p n`` entries.
* **What is saved.** PEFT's path keeps each branch's dropped copy of the input (q_proj and v_proj read
  the same normalised hidden states, so two copies per layer) and a boolean mask per branch. This
  function keeps the input itself (one tensor object, shared by every branch that reads it, and kept by
  no one else) and the dropped positions (int64, ``p n`` of them); the backward recomputes the dropped
  copy with one copy and one ``index_fill_``. With q_proj and v_proj adapted, the bytes kept per
  element of a layer's input fall from 10 (two float32 copies, two boolean masks) to 4 + 2 x 8p: 4.8 at
  p = 0.05.
* **Matrix layouts.** The skinny products run in the memory layout that MKL does fastest on these shapes
  (measured): ``a^T @ g`` for B's gradient (0.25 against 0.83 ms as ``g^T @ a``), ``g @ (B^T)^T`` with a
  contiguous ``B^T`` for the branch's input gradient (0.37 against 0.69 ms).

Values are PEFT's up to float rounding (the dropout scale ``1 / (1 - p)`` is applied to ``x A^T`` rather
than to ``x``; sums run in another order): checked in ``tests/test_lean_lora.py`` against PEFT's path with
the same dropped positions, and by ``gradcheck``. The dropout's *distribution* is PEFT's, not its draws.

:func:`lean_lora` installs this on every LoRA ``Linear`` layer of a PEFT model that lmtune trains on the
CPU. A layer takes it only in the plain case (one active vanilla adapter, not merged, not disabled, no
extra arguments, bias-free factors of the input's dtype on the CPU, and no hooks on the factors or the
dropout, which lmtune's Laplace curvature pass registers); anything else runs PEFT's own forward. CUDA
keeps PEFT's path: its fused dropout kernel has none of the costs above.
"""

from __future__ import annotations

import math
import types

import torch

_CHUNK_SIGMAS = 6.0  # the first draw covers n with this many standard deviations to spare


def dropped_positions(n: int, p: float, generator: torch.Generator | None = None, *,
                      first_chunk: int | None = None) -> torch.Tensor:
    """Sorted int64 positions in ``[0, n)``, each included independently with probability ``p``.

    The gaps between successive positions are drawn (geometric: ``1 + floor(log(1 - u) / log(1 - p))``
    for float64 uniforms ``u`` from ``generator``, torch's default CPU generator when None), which is an
    exact sampler of the i.i.d. Bernoulli(p) sequence and needs about ``p n`` draws instead of ``n``. The
    first draw holds the expected count plus six standard deviations; if the positions it reaches stop
    short of ``n``, more are drawn from where they stopped (``first_chunk`` sets the first draw's size,
    for tests of that path)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if n <= 0 or p == 0.0:
        return torch.empty(0, dtype=torch.long)
    log_keep = math.log1p(-p)
    mean = n * p
    m = first_chunk or int(mean + _CHUNK_SIGMAS * math.sqrt(mean * (1.0 - p)) + 16)
    parts, last = [], -1
    while True:
        u = torch.rand(m, dtype=torch.float64, generator=generator)
        gaps = torch.log1p(u.neg_()).div_(log_keep).floor_().add_(1.0).long()
        pos = torch.cumsum(gaps, 0).add_(last)
        k = int(torch.searchsorted(pos, n))
        parts.append(pos[:k])
        if k < m:
            break
        last = int(pos[-1])
        rest = (n - 1 - last) * p
        m = int(rest + _CHUNK_SIGMAS * math.sqrt(rest * (1.0 - p) + 1.0) + 16)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _dropped_copy(x2: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    if pos is None:
        return x2
    xd = x2.clone(memory_format=torch.contiguous_format)  # pos indexes the row-major order
    xd.view(-1).index_fill_(0, pos, 0.0)
    return xd


class LoraBranch(torch.autograd.Function):
    """``((x with the elements at pos zeroed) @ A^T * keep_scale) @ B^T * scaling`` for ``x`` (..., in),
    ``A`` (r, in), ``B`` (out, r); ``pos`` (int64, positions in ``x`` flattened) or None for no dropout.
    Saves ``x``, ``A``, ``B^T`` (contiguous), ``x A^T`` (r wide) and ``pos``; see the module docstring."""

    @staticmethod
    def forward(ctx, x, A, B, pos, keep_scale: float, scaling: float):
        x2 = x.reshape(-1, x.shape[-1])
        a = _dropped_copy(x2, pos) @ A.t()
        if keep_scale != 1.0:
            a.mul_(keep_scale)
        Bt = B.t().contiguous()  # (r, out): the layout both products with B run fastest in
        y = (a @ Bt).mul_(scaling)
        ctx.save_for_backward(x, A, Bt, a, pos)
        ctx.keep_scale, ctx.scaling = keep_scale, scaling
        return y.view(*x.shape[:-1], B.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x, A, Bt, a, pos = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_B = (a.t() @ g2).t().mul_(ctx.scaling) if ctx.needs_input_grad[2] else None
        ga = (g2 @ Bt.t()).mul_(ctx.scaling * ctx.keep_scale)  # d/d(dropped x A^T)
        grad_A = ga.t() @ _dropped_copy(x.reshape(-1, x.shape[-1]), pos) if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = ga @ A
            if pos is not None:
                grad_x.view(-1).index_fill_(0, pos, 0.0)
            grad_x = grad_x.view(x.shape)
        return grad_x, grad_A, grad_B, None, None, None


def _hooked(module: torch.nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


def _global_hooks() -> bool:
    m = torch.nn.modules.module
    return bool(getattr(m, "_global_forward_hooks", None) or getattr(m, "_global_forward_pre_hooks", None)
                or getattr(m, "_global_backward_hooks", None)
                or getattr(m, "_global_backward_pre_hooks", None))


def _plain_case(layer, x: torch.Tensor, args, kwargs):
    """(A, B, dropout, scaling) when ``layer``'s forward is the vanilla single-adapter LoRA case that
    :class:`LoraBranch` computes, else None."""
    if args or kwargs or layer.disable_adapters or layer.merged:
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if name in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(name, False):
        return None
    A, B, drop = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
    if type(A) is not torch.nn.Linear or type(B) is not torch.nn.Linear or A.bias is not None or B.bias is not None:
        return None
    if not isinstance(drop, (torch.nn.Dropout, torch.nn.Identity)):
        return None
    if x.device.type != "cpu" or not x.is_floating_point() or x.dtype != A.weight.dtype or B.weight.dtype != x.dtype:
        return None
    if _hooked(A) or _hooked(B) or _hooked(drop) or _global_hooks():
        return None
    return A, B, drop, layer.scaling[name]


def _lean_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    plain = _plain_case(self, x, args, kwargs)
    if plain is None:
        return type(self).forward(self, x, *args, **kwargs)
    A, B, drop, scaling = plain
    result = self.base_layer(x)
    p = float(getattr(drop, "p", 0.0)) if drop.training else 0.0
    if p >= 1.0:
        return result
    pos = dropped_positions(x.numel(), p) if p > 0.0 else None
    return result + LoraBranch.apply(x, A.weight, B.weight, pos, 1.0 / (1.0 - p), float(scaling))


def lean_lora(model: torch.nn.Module) -> int:
    """Give every PEFT LoRA ``Linear`` layer inside ``model`` the one-function branch (see the module
    docstring); returns how many layers. It stays for the life of those layer objects (lmtune's training
    model, discarded after training); layers outside the plain case keep PEFT's forward, call by call."""
    from peft.tuners.lora.layer import Linear

    n = 0
    for module in model.modules():
        if type(module) is Linear:
            module.forward = types.MethodType(_lean_forward, module)
            n += 1
    return n


def is_lean(module: torch.nn.Module) -> bool:
    """Whether :func:`lean_lora` was installed on ``module``."""
    f = module.__dict__.get("forward")
    return getattr(f, "__func__", None) is _lean_forward

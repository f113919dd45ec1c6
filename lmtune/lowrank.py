r"""Low-rank tools: the best rank-r approximation of a weight, and the spectrum of a LoRA update.

Eckart-Young-Mirsky (seed 001): with the SVD ``D = U diag(sigma) V^T`` (singular values descending), the
truncation ``D_r = U_r diag(sigma_r) V_r^T`` minimises ``||D - D_hat||`` over all ``rank(D_hat) <= r``, in
the Frobenius norm (error ``sqrt(sum_{j>r} sigma_j^2)``) and in the spectral norm (error
``sigma_{r+1}``). LoRA learns ``Delta W = (alpha / r) B A`` with ``B`` (m, r) and ``A`` (r, n); its
singular values say how much of the rank the update actually uses: the *energy rank* is the smallest k
whose top-k singular values hold a given share (default 90%) of ``||Delta W||_F^2``.

torch.linalg.svd does the work; what is written here is the bookkeeping (factors, errors, energy), which
no library exposes for a LoRA pair. The update's SVD is taken through QR factors of ``B`` and ``A^T``, so
an m x n product is never formed: O((m + n) r^2) instead of O(m n min(m, n)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LowRank:
    """A rank-r factorisation ``D_r = left @ right`` with the singular values of ``D``.

    Attributes
    ----------
    left : torch.Tensor
        (m, r) = U_r diag(sigma_r).
    right : torch.Tensor
        (r, n) = V_r^T.
    singular_values : torch.Tensor
        All of ``D``'s singular values, descending, (min(m, n),).
    """

    left: torch.Tensor
    right: torch.Tensor
    singular_values: torch.Tensor

    @property
    def rank(self) -> int:
        return self.left.shape[1]

    def matrix(self) -> torch.Tensor:
        return self.left @ self.right

    def frobenius_error(self) -> float:
        """``||D - D_r||_F`` from the discarded singular values (no reconstruction needed)."""
        return float(torch.linalg.vector_norm(self.singular_values[self.rank:]))

    def spectral_error(self) -> float:
        """``||D - D_r||_2 = sigma_{r+1}`` (0 when nothing was discarded)."""
        s = self.singular_values
        return float(s[self.rank]) if self.rank < len(s) else 0.0


def best_rank(D: torch.Tensor, r: int) -> LowRank:
    """The Eckart-Young best rank-``r`` approximation of a matrix ``D`` (m, n), computed in float64."""
    if D.ndim != 2:
        raise ValueError(f"expected a matrix, got shape {tuple(D.shape)}")
    if not 0 <= r <= min(D.shape):
        raise ValueError(f"rank must lie in [0, {min(D.shape)}], got {r}")
    U, s, Vh = torch.linalg.svd(D.detach().double(), full_matrices=False)
    return LowRank(U[:, :r] * s[:r], Vh[:r], s)


def lora_singular_values(B: torch.Tensor, A: torch.Tensor, scaling: float = 1.0) -> torch.Tensor:
    """Singular values of ``scaling * B @ A`` (B: (m, r), A: (r, n)), descending, length r.

    ``B = Q_B R_B`` and ``A^T = Q_A R_A`` give ``B A = Q_B (R_B R_A^T) Q_A^T`` with orthonormal ``Q``s, so
    the singular values are those of the r x r core.
    """
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"expected B (m, r) and A (r, n), got {tuple(B.shape)} and {tuple(A.shape)}")
    _, R_B = torch.linalg.qr(B.detach().double())
    _, R_A = torch.linalg.qr(A.detach().double().T)
    return abs(scaling) * torch.linalg.svdvals(R_B @ R_A.T)


def energy_rank(singular_values: torch.Tensor, share: float = 0.9) -> int:
    """Smallest k whose top-k singular values hold ``share`` of the squared Frobenius norm (0 for a zero
    matrix)."""
    if not 0.0 < share <= 1.0:
        raise ValueError(f"share must lie in (0, 1], got {share}")
    e = singular_values.double() ** 2
    total = float(e.sum())
    if total == 0.0:
        return 0
    cum = torch.cumsum(e, 0) / total
    # a relative tolerance keeps share=1.0 from failing on rounding in the last bit
    return int(torch.searchsorted(cum, torch.tensor(share - 1e-12, dtype=cum.dtype)).item()) + 1


def spectrum_report(singular_values: torch.Tensor, share: float = 0.9) -> dict:
    """JSON-able summary of a spectrum: the values, the energy share of each prefix, the energy rank."""
    s = singular_values.double()
    e = s**2
    total = float(e.sum())
    cum = (torch.cumsum(e, 0) / total).tolist() if total > 0 else [0.0] * len(s)
    return {"singular_values": s.tolist(), "cumulative_energy": cum, "energy_share": share,
            "energy_rank": energy_rank(s, share), "frobenius_norm": total ** 0.5}


def plot_spectrum(spectra: dict[str, torch.Tensor], path, share: float = 0.9) -> None:
    """PNG of each named spectrum's cumulative energy, with the ``share`` line and each energy rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, s in spectra.items():
        rep = spectrum_report(s, share)
        ks = range(1, len(rep["cumulative_energy"]) + 1)
        ax.plot(ks, rep["cumulative_energy"], marker="o", label=f"{name} (rank for {share:.0%}: {rep['energy_rank']})")
    ax.axhline(share, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("number of singular values k")
    ax.set_ylabel("share of ||ΔW||²_F in the top k")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def adapter_spectra(run) -> dict[str, torch.Tensor]:
    """Singular values of every LoRA update ``(alpha / r) B A`` in a PEFT adapter folder (an lmtune lora run).

    Keys are the adapted modules' names (``model.layers.3.self_attn.q_proj``). AdaLoRA's SVD-form
    ``P diag(lambda) Q`` and DoRA's magnitude vector are not plain ``B A`` pairs and are refused.
    """
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    from lmtune.errors import LmtuneError

    folder = Path(run)
    cfg_path, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise LmtuneError(f"{folder}: not a LoRA adapter folder (adapter_config.json and adapter_model.safetensors)")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora"):
        raise LmtuneError(f"{folder}: a {cfg.get('peft_type')}{' (DoRA)' if cfg.get('use_dora') else ''} adapter; "
                          "the spectrum analysis reads plain LoRA updates B A")
    tensors = load_file(str(weights))
    out = {}
    for key, A in tensors.items():
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        B = tensors[key.replace(".lora_A.", ".lora_B.")]
        r = A.shape[0]
        short = module.rsplit(".", 1)[-1]
        rank = cfg.get("rank_pattern", {}).get(short, r) if cfg.get("rank_pattern") else r
        alpha = (cfg.get("alpha_pattern") or {}).get(short, cfg.get("lora_alpha", r))
        scaling = alpha / (rank ** 0.5 if cfg.get("use_rslora") else rank)
        out[module] = lora_singular_values(B.double(), A.double(), scaling)
    if not out:
        raise LmtuneError(f"{folder}: the adapter holds no lora_A/lora_B pairs")
    return dict(sorted(out.items(), key=lambda kv: _module_order(kv[0])))


def _module_order(name: str):
    import re

    m = re.search(r"\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


def analyze_adapter(run, share: float = 0.9, plot=None) -> dict:
    """Spectrum and energy rank of every LoRA update in ``run``, a summary per module kind, and a PNG.

    Returns ``{"share", "modules": {name: spectrum_report}, "summary": {kind: {mean/min/max energy rank,
    rank r}}}``; ``plot`` (a path) gets the cumulative-energy curves, coloured by module kind, and the energy
    rank per layer.
    """
    spectra = adapter_spectra(run)
    modules = {name: spectrum_report(s, share) for name, s in spectra.items()}
    kinds: dict[str, list[int]] = {}
    for name, rep in modules.items():
        kinds.setdefault(name.rsplit(".", 1)[-1], []).append(rep["energy_rank"])
    summary = {k: {"modules": len(v), "rank": len(next(m for n, m in modules.items()
                                                         if n.endswith("." + k))["singular_values"]),
                   "mean_energy_rank": sum(v) / len(v), "min_energy_rank": min(v), "max_energy_rank": max(v)}
               for k, v in kinds.items()}
    if plot is not None:
        plot_adapter_spectra(modules, plot, share)
    return {"share": share, "modules": modules, "summary": summary}


def plot_adapter_spectra(modules: dict[str, dict], path, share: float = 0.9) -> None:
    """Two panels: each update's cumulative energy (coloured by module kind) and its energy rank per layer.

    Written to a temporary file and renamed, so an existing plot is never left half-written.
    """
    import os
    import tempfile
    from pathlib import Path

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    kinds = sorted({n.rsplit(".", 1)[-1] for n in modules})
    colours = {k: f"C{i}" for i, k in enumerate(kinds)}
    for name, rep in modules.items():
        kind = name.rsplit(".", 1)[-1]
        ks = range(1, len(rep["cumulative_energy"]) + 1)
        ax1.plot(ks, rep["cumulative_energy"], color=colours[kind], alpha=0.35, linewidth=1)
    for k in kinds:
        ax1.plot([], [], color=colours[k], label=k)
        pts = [(_module_order(n)[0], rep["energy_rank"]) for n, rep in modules.items() if n.endswith("." + k)]
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colours[k], label=k)
    ax1.axhline(share, color="grey", linestyle="--", linewidth=1)
    ax1.set(xlabel="number of singular values k", ylabel="share of ||ΔW||²_F in the top k", ylim=(0, 1.02),
            title="LoRA update spectra")
    ax2.set(xlabel="layer", ylabel=f"rank holding {share:.0%} of the energy", title="energy rank per layer")
    for axis in (ax1.xaxis, ax2.xaxis, ax2.yaxis):
        axis.set_major_locator(MaxNLocator(integer=True))
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)

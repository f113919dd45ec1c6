"""Eckart-Young truncation and LoRA update spectra."""

import pytest
import torch

from lmtune.lowrank import best_rank, energy_rank, lora_singular_values, plot_spectrum, spectrum_report


@pytest.fixture
def D():
    return torch.randn(40, 25, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("r", [0, 1, 5, 24, 25])
def test_eckart_young_error_is_the_discarded_singular_values(D, r):
    lr = best_rank(D, r)
    s = torch.linalg.svdvals(D)
    residual = D - lr.matrix()
    assert torch.linalg.matrix_rank(lr.matrix()) == r if r else torch.count_nonzero(lr.matrix()) == 0
    assert torch.linalg.matrix_norm(residual) == pytest.approx(float(s[r:].norm()), rel=1e-10, abs=1e-10)
    assert lr.frobenius_error() == pytest.approx(float(s[r:].norm()), rel=1e-12, abs=1e-12)
    expected_spectral = float(s[r]) if r < len(s) else 0.0
    assert torch.linalg.matrix_norm(residual, ord=2) == pytest.approx(expected_spectral, rel=1e-10, abs=1e-10)
    assert lr.spectral_error() == pytest.approx(expected_spectral, abs=1e-12)


def test_truncation_beats_other_rank_r_matrices(D):
    r = 4
    best = best_rank(D, r).frobenius_error()
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        other = torch.randn(40, r, generator=g, dtype=torch.float64) @ torch.randn(r, 25, generator=g, dtype=torch.float64)
        # the best rank-r fit within the column space of a random factor is still no better
        coef = torch.linalg.lstsq(other, D).solution
        assert torch.linalg.matrix_norm(D - other @ coef) >= best - 1e-12


def test_exact_for_low_rank_input():
    g = torch.Generator().manual_seed(2)
    M = torch.randn(30, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 20, generator=g, dtype=torch.float64)
    lr = best_rank(M, 3)
    torch.testing.assert_close(lr.matrix(), M)
    assert lr.frobenius_error() < 1e-10


def test_lora_singular_values_match_the_product():
    g = torch.Generator().manual_seed(3)
    B, A = torch.randn(64, 8, generator=g), torch.randn(8, 48, generator=g)
    got = lora_singular_values(B, A, scaling=2.0)
    ref = torch.linalg.svdvals(2.0 * B.double() @ A.double())[:8]
    torch.testing.assert_close(got, ref)


def test_energy_rank():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert energy_rank(s, 0.5) == 1
    assert energy_rank(s, 9 / 14) == 1
    assert energy_rank(s, 0.9) == 2
    assert energy_rank(s, 1.0) == 3
    assert energy_rank(torch.zeros(3)) == 0
    with pytest.raises(ValueError):
        energy_rank(s, 0.0)


def test_spectrum_report_and_plot(tmp_path):
    s = torch.tensor([4.0, 2.0, 1.0])
    rep = spectrum_report(s)
    assert rep["energy_rank"] == 2 and rep["cumulative_energy"][-1] == pytest.approx(1.0)
    out = tmp_path / "spectrum.png"
    plot_spectrum({"q_proj": s, "v_proj": torch.tensor([1.0, 1.0, 1.0])}, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments(D):
    with pytest.raises(ValueError, match="rank must lie"):
        best_rank(D, 26)
    with pytest.raises(ValueError, match="expected a matrix"):
        best_rank(D[0], 1)
    with pytest.raises(ValueError, match="expected B"):
        lora_singular_values(torch.ones(3, 2), torch.ones(3, 4))


def test_adapter_spectra_of_a_trained_lora_run(tiny_lm, review_task, tmp_path, capsys):
    import json

    from safetensors.torch import load_file

    from lmtune.cli import main
    from lmtune.data import Dataset, open_data
    from lmtune.lowrank import analyze_adapter
    from lmtune.methods import LoraClassifier

    tr = open_data("builtin:reviews:train")
    data = Dataset(tr.records[:16], tr.lines[:16], tr.path)
    run = LoraClassifier(tiny_lm, review_task, rank=4, alpha=8, lr=0.05, epochs=2, progress=False,
                         cache=False).fit(data).save(tmp_path / "run")
    res = analyze_adapter(run, share=0.9, plot=tmp_path / "spectrum.png")
    assert (tmp_path / "spectrum.png").stat().st_size > 1000
    assert set(res["summary"]) == {"q_proj", "v_proj"} and len(res["modules"]) == 4  # 2 layers x 2 targets
    # The QR route agrees with a plain SVD of the full update (alpha / r) B A.
    t = load_file(str(run / "adapter_model.safetensors"))
    name = "model.layers.1.self_attn.q_proj"
    A = t[f"base_model.model.{name}.lora_A.weight"].double()
    B = t[f"base_model.model.{name}.lora_B.weight"].double()
    direct = torch.linalg.svdvals(2.0 * B @ A)[:4]
    assert torch.allclose(torch.tensor(res["modules"][name]["singular_values"], dtype=torch.float64), direct,
                          atol=1e-10)
    assert all(1 <= rep["energy_rank"] <= 4 for rep in res["modules"].values())
    assert main(["spectrum", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["summary"]["q_proj"]["rank"] == 4

"""benchmarks/calibration_seeds.py: the summary of several calibration runs (one per seed)."""

import pytest
from conftest import load_benchmark


@pytest.fixture(scope="module")
def seeds():
    return load_benchmark("calibration_seeds")


def _run(seed, rows, over_epoch=1.4):
    return {"setup": {"seed": seed, "n_test": 200, "lora": {"epochs": 8}},
            "environment": {"lmtune_commit": "abc1234"},
            "goals": {"ece_ratio_goal": 0.5},
            "rows": {name: {"accuracy": acc, "nll": 0.4, "ece": ece,
                            "ece_sampling": {"calibrated_floor": 0.05, "ratio_interval": [0.5, 1.5]}}
                     for name, (acc, ece) in rows.items()},
            "laplace_cost": {"laplace_over_epoch": over_epoch, "sampled_curvature": {"over_epoch": over_epoch / 2},
                             "laplace_peak_rss_bytes": 2, "training_peak_rss_bytes": 1}}


def test_ratios_means_and_the_goal_count(seeds):
    runs = [_run(0, {"lora (MAP)": (0.88, 0.10), "laplace": (0.88, 0.04), "shaky": (0.70, 0.02)}),
            _run(1, {"lora (MAP)": (0.86, 0.04), "laplace": (0.86, 0.06), "shaky": (0.86, 0.01)}, over_epoch=0.9)]
    s = seeds.summarise(runs)
    la = s["methods"]["laplace"]
    assert [p["ece_ratio"] for p in la["per_seed"]] == pytest.approx([0.4, 1.5])
    assert la["mean_ece_ratio"] == pytest.approx(0.95)
    assert la["ratio_of_mean_ece"] == pytest.approx(0.05 / 0.07)
    assert la["seeds_meeting_goal"] == 1
    # half the MAP's ECE: 0.05 and 0.02 against a floor of 0.05 for this row's confidences
    assert [p["goal_below_own_floor"] for p in la["per_seed"]] == [False, True]
    assert la["seeds_goal_below_own_floor"] == 1
    # seed 0's ratio 0.2 comes with 18 points of accuracy lost: beyond one binomial standard error
    assert s["methods"]["shaky"]["seeds_meeting_goal"] == 1
    assert s["laplace_cost"]["laplace_over_epoch"] == [1.4, 0.9]
    assert s["seeds"] == [0, 1] and s["commits"] == ["abc1234"]
    table = seeds.markdown(s)
    assert "| laplace | 0.880 / 0.040 (0.40) | 0.860 / 0.060 (1.50) | 0.050 (0.71) | 1 of 2 |" in table


def test_rows_missing_from_a_run_are_left_out(seeds):
    runs = [_run(0, {"lora (MAP)": (0.9, 0.1), "svgd": (0.9, 0.05)}), _run(1, {"lora (MAP)": (0.9, 0.1)})]
    assert list(seeds.summarise(runs)["methods"]) == ["lora (MAP)"]

"""Tests for lmtune.metrics: against scikit-learn, hand-worked examples and independent loops."""

import json
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from lmtune import metrics as M


def _random_probs(rng, n, k, floor=0.02):
    """Random probability rows, bounded away from 0 so clipping conventions never matter."""
    p = rng.dirichlet(np.ones(k), size=n)
    return (1.0 - floor) * p + floor / k


# --------------------------------------------------------------------------
# hard-label metrics against sklearn
# --------------------------------------------------------------------------


@pytest.fixture
def hard_labels():
    """K=5; class 3 is never predicted, class 4 never occurs in y_true."""
    rng = np.random.default_rng(0)
    k, n = 5, 300
    y_true = rng.integers(0, 4, size=n)  # class 4 absent
    noise = rng.integers(0, k, size=n)
    y_pred = np.where(rng.random(n) < 0.6, y_true, noise)
    y_pred[y_pred == 3] = 4  # class 3 never predicted; some class-4 predictions (all wrong)
    assert 4 not in y_true and 3 not in y_pred and 4 in y_pred and 3 in y_true
    return y_true, y_pred, k


def test_accuracy_matches_sklearn(hard_labels):
    y_true, y_pred, _ = hard_labels
    acc = M.accuracy(y_true, y_pred)
    assert type(acc) is float
    assert acc == pytest.approx(skm.accuracy_score(y_true, y_pred), abs=1e-15)
    assert 0.3 < acc < 0.9  # the fixture is neither trivial nor hopeless


def test_confusion_matrix_matches_sklearn(hard_labels):
    y_true, y_pred, k = hard_labels
    cm = M.confusion_matrix(y_true, y_pred, k)
    assert cm.shape == (k, k)
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, skm.confusion_matrix(y_true, y_pred, labels=list(range(k))))
    # orientation: rows true, columns predicted
    assert cm[:, 3].sum() == 0 and cm[4, :].sum() == 0
    assert cm[3, :].sum() > 0 and cm[:, 4].sum() > 0


def test_confusion_matrix_orientation_small():
    cm = M.confusion_matrix([0, 0, 1], [1, 1, 1], 2)
    np.testing.assert_array_equal(cm, [[0, 2], [0, 1]])


def test_precision_recall_f1_matches_sklearn(hard_labels):
    y_true, y_pred, k = hard_labels
    out = M.precision_recall_f1(y_true, y_pred, k)
    assert set(out) == {
        "precision", "recall", "f1", "support", "macro_precision", "macro_recall", "macro_f1",
    }
    labels = list(range(k))
    p, r, f, s = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    np.testing.assert_allclose(out["precision"], p, rtol=0, atol=1e-12)
    np.testing.assert_allclose(out["recall"], r, rtol=0, atol=1e-12)
    np.testing.assert_allclose(out["f1"], f, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(out["support"], s)
    assert out["support"].dtype.kind == "i"
    for ours, avg in [("macro_precision", 0), ("macro_recall", 1), ("macro_f1", 2)]:
        ref = skm.precision_recall_fscore_support(
            y_true, y_pred, labels=labels, average="macro", zero_division=0
        )[avg]
        assert type(out[ours]) is float
        assert out[ours] == pytest.approx(ref, abs=1e-12)
    # zero-division convention
    assert out["precision"][3] == 0.0  # never predicted
    assert out["recall"][4] == 0.0 and out["f1"][4] == 0.0  # absent from y_true
    assert out["support"][4] == 0
    assert out["precision"][4] == 0.0  # predicted, but always wrong


def test_precision_recall_f1_hand_example():
    # class 0: tp=1 fp=1 fn=1 ; class 1: tp=1 fp=1 fn=1 ; class 2: never true, never predicted
    out = M.precision_recall_f1([0, 0, 1, 1], [0, 1, 0, 1], 3)
    np.testing.assert_allclose(out["precision"], [0.5, 0.5, 0.0])
    np.testing.assert_allclose(out["recall"], [0.5, 0.5, 0.0])
    np.testing.assert_allclose(out["f1"], [0.5, 0.5, 0.0])
    assert out["macro_f1"] == pytest.approx(1.0 / 3.0)  # averaged over all K=3 classes


# --------------------------------------------------------------------------
# NLL and Brier
# --------------------------------------------------------------------------


def test_nll_matches_sklearn_log_loss():
    rng = np.random.default_rng(1)
    k, n = 4, 200
    probs = _random_probs(rng, n, k)
    y = rng.integers(0, k, size=n)
    ours = M.nll(y, probs)
    assert type(ours) is float
    assert ours == pytest.approx(skm.log_loss(y, probs, labels=list(range(k))), rel=1e-12)


def test_nll_clips_at_eps():
    probs = np.array([[1.0, 0.0], [0.5, 0.5]])
    y = np.array([1, 0])
    assert M.nll(y, probs) == pytest.approx((-math.log(1e-12) - math.log(0.5)) / 2)
    assert M.nll(y, probs, eps=1e-6) == pytest.approx((-math.log(1e-6) - math.log(0.5)) / 2)


def test_brier_binary_is_twice_sklearn():
    rng = np.random.default_rng(2)
    n = 150
    probs = _random_probs(rng, n, 2, floor=0.0)
    y = rng.integers(0, 2, size=n)
    assert set(y.tolist()) == {0, 1}
    ref = skm.brier_score_loss(y, probs[:, 1])
    assert M.brier(y, probs) == pytest.approx(2.0 * ref, rel=1e-12)


def test_brier_multiclass_matches_loop():
    rng = np.random.default_rng(3)
    k, n = 3, 120
    probs = _random_probs(rng, n, k, floor=0.0)
    y = rng.integers(0, k, size=n)
    total = 0.0
    for i in range(n):
        for c in range(k):
            target = 1.0 if y[i] == c else 0.0
            total += (probs[i, c] - target) ** 2
    assert M.brier(y, probs) == pytest.approx(total / n, rel=1e-12)


def test_brier_extremes():
    assert M.brier([0, 1], [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]) == 0.0
    assert M.brier([0], [[0.0, 1.0, 0.0]]) == 2.0


# --------------------------------------------------------------------------
# reliability and ECE
# --------------------------------------------------------------------------


def _hand_example():
    """n_bins=4, edges [0, .25, .5, .75, 1] (all exact in binary floating point).

    row                    y  pred conf  bin  correct
    [0.50, 0.50, 0.00]     0  0    0.50  1    yes  (tie -> lowest index; 0.5 on an edge -> lower bin)
    [0.40, 0.30, 0.30]     1  0    0.40  1    no
    [0.10, 0.20, 0.70]     2  2    0.70  2    yes
    [0.75, 0.25, 0.00]     1  0    0.75  2    no   (0.75 on an edge -> lower bin)
    [0.00, 0.00, 1.00]     2  2    1.00  3    yes  (exactly 1 -> last bin)
    [0.00, 1.00, 0.00]     0  1    1.00  3    no

    bin 0: empty
    bin 1: n=2, conf=(0.5+0.4)/2=0.45,  acc=0.5 -> |gap|=0.05
    bin 2: n=2, conf=(0.7+0.75)/2=0.725, acc=0.5 -> |gap|=0.225
    bin 3: n=2, conf=1.0,              acc=0.5 -> |gap|=0.5
    ECE = 2/6 * (0.05 + 0.225 + 0.5) = 0.775 / 3
    """
    probs = np.array(
        [
            [0.50, 0.50, 0.00],
            [0.40, 0.30, 0.30],
            [0.10, 0.20, 0.70],
            [0.75, 0.25, 0.00],
            [0.00, 0.00, 1.00],
            [0.00, 1.00, 0.00],
        ]
    )
    y = np.array([0, 1, 2, 1, 2, 0])
    return y, probs


def test_reliability_hand_worked():
    y, probs = _hand_example()
    rel = M.reliability(y, probs, n_bins=4)
    np.testing.assert_array_equal(rel["bin_edges"], [0.0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_array_equal(rel["counts"], [0, 2, 2, 2])
    assert np.isnan(rel["confidence"][0]) and np.isnan(rel["accuracy"][0])
    np.testing.assert_allclose(rel["confidence"][1:], [0.45, 0.725, 1.0], atol=1e-12)
    np.testing.assert_allclose(rel["accuracy"][1:], [0.5, 0.5, 0.5], atol=1e-12)


def test_ece_hand_worked():
    y, probs = _hand_example()
    assert M.ece(y, probs, n_bins=4) == pytest.approx(0.775 / 3.0, abs=1e-12)
    # a single bin: |mean acc - mean conf| = |3/6 - (0.5+0.4+0.7+0.75+1+1)/6|
    assert M.ece(y, probs, n_bins=1) == pytest.approx(abs(0.5 - 4.35 / 6.0), abs=1e-12)


def test_bin_index_edges_and_zero():
    edges = np.linspace(0.0, 1.0, 5)
    conf = np.array([0.0, 0.1, 0.25, 0.26, 0.5, 0.75, 0.99, 1.0, 1.00005])
    np.testing.assert_array_equal(M._bin_index(conf, edges), [0, 0, 0, 1, 1, 2, 3, 3, 3])


def test_ece_zero_for_perfectly_calibrated():
    rows, ys = [], []

    def add(row, n_right, n_wrong):
        pred = int(np.argmax(row))
        wrong = (pred + 1) % len(row)
        for _ in range(n_right):
            rows.append(row)
            ys.append(pred)
        for _ in range(n_wrong):
            rows.append(row)
            ys.append(wrong)

    add([0.7, 0.3], 7, 3)  # conf 0.7, accuracy 7/10
    add([0.2, 0.8], 4, 1)  # conf 0.8, accuracy 4/5
    add([0.5, 0.5], 1, 1)  # conf 0.5, accuracy 1/2
    add([0.0, 1.0], 3, 0)  # conf 1.0, accuracy 1
    y, probs = np.array(ys), np.array(rows)
    for n_bins in (10, 15, 20):
        assert M.ece(y, probs, n_bins=n_bins) == pytest.approx(0.0, abs=1e-12)
    # and the construction is sensitive: flipping one label breaks calibration
    y2 = y.copy()
    y2[0] = 1 - y2[0]
    assert M.ece(y2, probs, n_bins=10) > 0.01


def _ece_loop(y, probs, n_bins):
    """Independent, deliberately naive implementation."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = [[] for _ in range(n_bins)]
    for i in range(len(y)):
        row = list(probs[i])
        conf = max(row)
        pred = row.index(conf)  # first maximum
        b = None
        for j in range(n_bins):
            lo, hi = edges[j], edges[j + 1]
            if (lo < conf <= hi) or (j == 0 and conf == lo):
                b = j
                break
        assert b is not None
        bins[b].append((conf, 1.0 if pred == y[i] else 0.0))
    total = 0.0
    for members in bins:
        if members:
            conf_b = sum(c for c, _ in members) / len(members)
            acc_b = sum(a for _, a in members) / len(members)
            total += len(members) / len(y) * abs(acc_b - conf_b)
    return total, [len(m) for m in bins]


@pytest.mark.parametrize("n_bins", [1, 5, 15, 23])
def test_ece_matches_loop_on_random_data(n_bins):
    rng = np.random.default_rng(10 + n_bins)
    k, n = 4, 400
    # sharpen some rows so confidences spread over the whole range
    logits = rng.normal(size=(n, k)) * rng.uniform(0.1, 4.0, size=(n, 1))
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    y = np.where(rng.random(n) < 0.6, probs.argmax(axis=1), rng.integers(0, k, size=n))
    ref, ref_counts = _ece_loop(y, probs, n_bins)
    assert M.ece(y, probs, n_bins=n_bins) == pytest.approx(ref, abs=1e-12)
    np.testing.assert_array_equal(M.reliability(y, probs, n_bins=n_bins)["counts"], ref_counts)
    assert ref > 0.0


# --------------------------------------------------------------------------
# flips
# --------------------------------------------------------------------------


def test_flips_hand_worked():
    y_true = [0, 1, 2, 0, 1, 2, 0, 1]
    base = [0, 0, 2, 1, 1, 0, 0, 2]
    new = [0, 1, 0, 2, 1, 0, 1, 1]
    # idx 0: same, right        idx 1: wrong->right   idx 2: right->wrong
    # idx 3: wrong->wrong       idx 4: same, right    idx 5: same, wrong
    # idx 6: right->wrong       idx 7: wrong->right
    out = M.flips(y_true, base, new)
    assert out == {
        "n": 8,
        "flipped": 5,
        "wrong_to_right": 2,
        "right_to_wrong": 2,
        "wrong_to_wrong": 1,
        "net_gain": 0,
        "indices": {"wrong_to_right": [1, 7], "right_to_wrong": [2, 6], "wrong_to_wrong": [3]},
    }
    json.dumps(out, allow_nan=False)
    assert all(type(v) is int for v in out["indices"]["wrong_to_right"])
    # net gain equals the change in the number of correct answers
    out2 = M.flips(y_true, base, [0, 1, 2, 0, 1, 2, 0, 2])
    assert out2["net_gain"] == 3 - 0 and out2["wrong_to_right"] == 3


# --------------------------------------------------------------------------
# report and to_jsonable
# --------------------------------------------------------------------------


def _assert_plain(obj, path="report"):
    if isinstance(obj, dict):
        for key, value in obj.items():
            assert type(key) is str, f"{path}: key {key!r} is {type(key)}"
            _assert_plain(value, f"{path}.{key}")
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            _assert_plain(value, f"{path}[{i}]")
    else:
        assert obj is None or type(obj) in (str, int, float, bool), f"{path}: {type(obj)}"
        if type(obj) is float:
            assert math.isfinite(obj), path


def test_classification_report_jsonable_and_consistent():
    rng = np.random.default_rng(4)
    k, n = 4, 250
    labels = ["neg", "neu", "pos", "other"]
    probs = _random_probs(rng, n, k, floor=0.0)
    probs[0] = [0.4, 0.4, 0.1, 0.1]  # tie: prediction must be index 0
    y = rng.integers(0, 3, size=n)  # class 3 absent from y_true
    y[0] = 0
    rep = M.classification_report(y, probs, labels, n_bins=10)

    text = json.dumps(rep, allow_nan=False)
    assert json.loads(text) == rep
    _assert_plain(rep)
    assert list(rep) == [
        "n", "accuracy", "macro_precision", "macro_recall", "macro_f1",
        "nll", "brier", "ece", "ece_bins", "per_class", "confusion_matrix",
    ]

    pred = np.argmax(probs, axis=1)
    assert pred[0] == 0
    prf = M.precision_recall_f1(y, pred, k)
    assert rep["n"] == n
    assert rep["accuracy"] == M.accuracy(y, pred)
    assert rep["macro_precision"] == prf["macro_precision"]
    assert rep["macro_recall"] == prf["macro_recall"]
    assert rep["macro_f1"] == prf["macro_f1"]
    assert rep["nll"] == M.nll(y, probs)
    assert rep["brier"] == M.brier(y, probs)
    assert rep["ece"] == M.ece(y, probs, n_bins=10)
    assert rep["ece"] != M.ece(y, probs, n_bins=15)  # n_bins is really used
    assert rep["ece_bins"] == 10
    assert list(rep["per_class"]) == labels
    for i, name in enumerate(labels):
        assert rep["per_class"][name] == {
            "precision": float(prf["precision"][i]),
            "recall": float(prf["recall"][i]),
            "f1": float(prf["f1"][i]),
            "support": int(prf["support"][i]),
        }
    assert rep["per_class"]["other"]["support"] == 0
    assert rep["confusion_matrix"]["labels"] == labels
    assert rep["confusion_matrix"]["matrix"] == M.confusion_matrix(y, pred, k).tolist()


def test_classification_report_validates_labels():
    y, probs = _hand_example()
    with pytest.raises(ValueError, match="labels has 2 names"):
        M.classification_report(y, probs, ["a", "b"])
    with pytest.raises(ValueError, match="distinct"):
        M.classification_report(y, probs, ["a", "b", "a"])
    with pytest.raises(ValueError, match="strings"):
        M.classification_report(y, probs, ["a", "b", 3])


def test_to_jsonable():
    obj = {
        "a": np.float32(0.5),
        "b": np.int64(3),
        "c": np.array([[1.0, np.nan], [np.inf, 2.0]]),
        "d": (np.bool_(True), float("nan"), [np.int32(7)]),
        np.int64(5): np.str_("x"),
        "e": None,
    }
    out = M.to_jsonable(obj)
    assert out == {
        "a": 0.5,
        "b": 3,
        "c": [[1.0, None], [None, 2.0]],
        "d": [True, None, [7]],
        5: "x",
        "e": None,
    }
    assert type(out["a"]) is float and type(out["b"]) is int
    assert type(out["d"][0]) is bool and type(out[5]) is str
    assert type(list(out)[4]) is int
    json.dumps(out, allow_nan=False)
    with pytest.raises(TypeError, match="cannot convert"):
        M.to_jsonable({"x": object()})


# --------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------


GOOD_Y = np.array([0, 1, 2])
GOOD_P = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.3, 0.3, 0.4]])


@pytest.mark.parametrize("fn", [M.nll, M.brier, M.ece, M.reliability])
@pytest.mark.parametrize(
    "y, probs, match",
    [
        (GOOD_Y, GOOD_P[0], r"probs must be 2-D"),
        (GOOD_Y, GOOD_P[:2], r"probs has 2 rows but y_true has 3"),
        (GOOD_Y[:, None], GOOD_P, r"y_true must be 1-D"),
        (GOOD_Y.astype(float), GOOD_P, r"y_true must hold integer"),
        (np.array([], dtype=int), np.zeros((0, 3)), r"y_true is empty"),
        (GOOD_Y, GOOD_P * 1.01, r"rows must sum to 1"),
        (GOOD_Y, np.array([[0.5, 0.5, 0.0], [0.2, 0.7, 0.1], [0.3, 0.3, 0.5]]),
         r"first is row 2"),
        (GOOD_Y, np.array([[np.nan, 0.5, 0.5], [0.2, 0.7, 0.1], [0.3, 0.3, 0.4]]),
         r"finite"),
        (GOOD_Y, np.array([[1.2, -0.2, 0.0], [0.2, 0.7, 0.1], [0.3, 0.3, 0.4]]),
         r"non-negative"),
        (np.array([0, 1, 3]), GOOD_P, r"y_true has 1 value\(s\) outside \[0, 3\)"),
        (np.array([0, -1, 2]), GOOD_P, r"outside \[0, 3\)"),
    ],
)
def test_prob_validation(fn, y, probs, match):
    with pytest.raises(ValueError, match=match):
        fn(y, probs)


def test_prob_validation_accepts_small_row_sum_error():
    p = GOOD_P.copy()
    p[:, 0] += 5e-5
    assert np.isfinite(M.nll(GOOD_Y, p))
    p[:, 0] += 1e-4  # now 1.5e-4 off
    with pytest.raises(ValueError, match="sum to 1"):
        M.nll(GOOD_Y, p)


def test_hard_label_validation():
    with pytest.raises(ValueError, match="same length"):
        M.accuracy([0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match="y_pred must be 1-D"):
        M.accuracy([0, 1], [[0, 1]])
    with pytest.raises(ValueError, match="y_pred has 1 value"):
        M.confusion_matrix([0, 1], [0, 2], 2)
    with pytest.raises(ValueError, match="y_true has 1 value"):
        M.precision_recall_f1([0, 5], [0, 1], 3)
    with pytest.raises(ValueError, match="n_classes"):
        M.confusion_matrix([0, 1], [0, 1], 0)
    with pytest.raises(ValueError, match="n_bins"):
        M.ece(GOOD_Y, GOOD_P, n_bins=0)
    with pytest.raises(ValueError, match="new_pred"):
        M.flips([0, 1], [0, 1], [0])
    with pytest.raises(ValueError, match="eps"):
        M.nll(GOOD_Y, GOOD_P, eps=0.0)


# --------------------------------------------------------------------------
# ECE against the test set's sampling noise
# --------------------------------------------------------------------------


def _sharp_probs(rng, n, k, sharp=3.0):
    z = rng.normal(size=(n, k)) * sharp
    p = np.exp(z - z.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


@pytest.mark.parametrize("k", [2, 4])
def test_ece_sampling_reports_the_same_ece_and_an_interval_around_it(k):
    rng = np.random.default_rng(0)
    p = _sharp_probs(rng, 300, k)
    y = rng.integers(0, k, size=300)
    out = M.ece_sampling(y, p, n_bins=10, draws=500)
    assert out["ece"] == pytest.approx(M.ece(y, p, n_bins=10), abs=1e-12)
    lo, hi = out["interval"]
    assert lo < out["ece"] < hi


def test_ece_calibrated_floor_is_what_a_calibrated_model_scores_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    floors = {}
    for n in (200, 5000):
        p = _sharp_probs(rng, n, 2)
        y = (rng.random(n) < p[:, 1]).astype(int)  # labels drawn from the predictions: calibrated
        out = M.ece_sampling(y, p, draws=400, seed=3)
        assert out["ece"] <= out["calibrated_floor_upper"] + 0.01
        floors[n] = out["calibrated_floor"]
    assert 0.01 < floors[200] < 0.12
    assert floors[5000] < floors[200] / 3  # about 1/sqrt(N)
    # certain and always right: nothing left to sample
    certain = np.tile([0.0, 1.0], (50, 1))
    assert M.ece_sampling(np.ones(50, int), certain, draws=50)["calibrated_floor"] == 0.0


def test_ece_sampling_ratio_against_a_reference():
    rng = np.random.default_rng(2)
    p = _sharp_probs(rng, 200, 2)
    y = rng.integers(0, 2, size=200)
    same = M.ece_sampling(y, p, reference=p, draws=200)
    assert same["ratio"] == pytest.approx(1.0) and same["ratio_interval"] == pytest.approx([1.0, 1.0])
    softer = (p + 0.5) / 2.0  # halfway to uniform
    out = M.ece_sampling(y, softer, reference=p, draws=300)
    assert out["reference_ece"] == pytest.approx(M.ece(y, p))
    assert out["ratio"] == pytest.approx(M.ece(y, softer) / M.ece(y, p))
    lo, hi = out["ratio_interval"]
    assert lo <= out["ratio"] <= hi
    with pytest.raises(ValueError, match="reference"):
        M.ece_sampling(y, p, reference=np.full((200, 3), 1 / 3))
    with pytest.raises(ValueError, match="draws"):
        M.ece_sampling(y, p, draws=0)
    with pytest.raises(ValueError, match="level"):
        M.ece_sampling(y, p, level=1.0)

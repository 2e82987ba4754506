"""Aggregation and agreement statistics against hand-computed values."""

from __future__ import annotations

import pytest

from align.data.agreement import (
    aggregate_label,
    agreement_report,
    cohen_kappa,
    krippendorff_alpha_nominal,
    raw_agreement,
)


def test_aggregate_rules():
    assert aggregate_label(["a", "a", "b"], "majority") == ("a", "")
    assert aggregate_label(["a", "b"], "majority") == (None, "no_majority")
    assert aggregate_label(["tie", "tie", "a"], "majority") == (None, "tie")
    assert aggregate_label(["b"], "majority") == ("b", "")
    assert aggregate_label(["a", "a"], "unanimous") == ("a", "")
    assert aggregate_label(["a", "a", "b"], "unanimous") == (None, "not_unanimous")
    assert aggregate_label(["tie", "tie"], "unanimous") == (None, "tie")


def test_two_annotators_kappa_alpha_raw():
    first = ["a", "a", "b", "b", "a", "tie"]
    second = ["a", "b", "b", "b", "a", "a"]
    # p_o = 4/6; marginals first a3 b2 tie1, second a3 b3: p_e = (3*3 + 2*3) / 36 = 15/36
    # kappa = (24/36 - 15/36) / (21/36) = 9/21
    assert cohen_kappa(first, second) == pytest.approx(9 / 21)
    units = [list(pair) for pair in zip(first, second)]
    assert raw_agreement(units) == pytest.approx(4 / 6)
    # coincidences: o[a,a]=4, o[b,b]=4, o[a,b]=o[b,a]=1, o[a,tie]=o[tie,a]=1; n_a=6, n_b=5, n_tie=1, n=12
    # D_o = 4, sum_{c!=k} n_c n_k = 2 * (30 + 6 + 5) = 82 -> alpha = 1 - 11 * 4 / 82 = 19/41
    assert krippendorff_alpha_nominal(units) == pytest.approx(19 / 41)


def test_alpha_with_three_coders_and_missing_labels():
    units = [["a", "a", "a"], ["a", "b"], ["b", "b", "tie"], ["a"]]  # the lone label is not pairable
    # unit 1: 6 ordered (a,a) pairs of weight 1/2 -> o[a,a]=3; unit 2: o[a,b]=o[b,a]=1;
    # unit 3: (b,b) x2, (b,tie) x2, (tie,b) x2, weight 1/2 -> o[b,b]=1, o[b,tie]=o[tie,b]=1.
    # n_a=4, n_b=3, n_tie=1, n=8; D_o=4; sum n_c n_k = 2 * (12 + 4 + 3) = 38 -> alpha = 1 - 7 * 4 / 38 = 5/19
    assert krippendorff_alpha_nominal(units) == pytest.approx(5 / 19)
    assert raw_agreement(units) == pytest.approx(4 / 7)  # 3 + 0 + 1 agreeing of 3 + 1 + 3 pairs


def test_undefined_cases():
    assert krippendorff_alpha_nominal([["a", "a"], ["a", "a"]]) is None  # no expected disagreement
    assert krippendorff_alpha_nominal([["a"], ["b"]]) is None
    assert raw_agreement([["a"]]) is None
    assert cohen_kappa(["a", "a"], ["a", "a"]) is None
    assert cohen_kappa([], []) is None


def test_perfect_and_systematic_disagreement():
    assert krippendorff_alpha_nominal([["a", "a"], ["b", "b"], ["tie", "tie"]]) == pytest.approx(1.0)
    assert cohen_kappa(["a", "b", "a", "b"], ["b", "a", "b", "a"]) == pytest.approx(-1.0)


def test_report_per_annotator_and_kappa_only_for_two():
    units = [[("x", "a"), ("y", "a")], [("x", "b"), ("y", "a")], [("x", "a")]]
    report = agreement_report(units)
    assert report["units_multi"] == 2 and report["annotators"] == 2
    # kappa over the 2 shared units: p_o = 1/2, p_e = (1*2 + 1*0) / 4 = 1/2 -> 0
    assert report["cohen_kappa"] == pytest.approx(0.0)
    assert report["per_annotator"]["x"] == {"labels": 3, "ties": 0, "agreement": 0.5}  # agrees with y once of twice
    three = agreement_report(units + [[("z", "a"), ("x", "a")]])
    assert three["cohen_kappa"] is None and three["annotators"] == 3

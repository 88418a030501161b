"""VQA answer normalisation and scoring."""

from __future__ import annotations

import json

import pytest

from mmalign.evaluate import majority_baseline, normalize_answer, vqa_score


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Red.", "red"),
        ("  The  red circle ", "red circle"),
        ("two", "2"),
        ("an apple", "apple"),
        ("dont", "don't"),
        ("yes!", "yes"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_vqa_score_single_and_multi_answer():
    assert vqa_score("Two", ["2"]) == 1.0
    assert vqa_score("three", ["2"]) == 0.0
    humans = ["red"] * 2 + ["blue"] * 8
    assert vqa_score("red", humans) == pytest.approx(2 / 3)
    assert vqa_score("blue", humans) == 1.0


def test_majority_baseline(tmp_path):
    recs = [
        {"id": i, "question_type": t, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": a}]}
        for i, (t, a) in enumerate([("color", "red"), ("color", "red"), ("color", "blue"), ("size", "small")])
    ]
    (tmp_path / "qa.json").write_text(json.dumps(recs))
    got = majority_baseline(tmp_path / "qa.json")
    assert got["by_type"] == {"color": pytest.approx(2 / 3), "size": 1.0}
    assert got["all"] == pytest.approx(3 / 4)  # 2 of 3 colours + 1 of 1 size, over 4 samples

import json
import math

import pytest
import torch
import torch.nn.functional as F

from mmalign.fusion.data import task_specs
from mmalign.fusion.tasks import TaskSpec, contrastive_sum, format_score, match_matrix, retrieval_scores


def reference_supcon(z, keys, temperature):
    """Khosla et al.'s L_out, one anchor at a time."""
    z = F.normalize(z, dim=-1)
    total = torch.zeros(())
    for i in range(len(z)):
        others = [j for j in range(len(z)) if j != i]
        matches = [j for j in others if keys[j] == keys[i]]
        if not matches:
            continue
        denominator = torch.logsumexp(torch.stack([z[i] @ z[j] / temperature for j in others]), dim=0)
        total = total - sum(z[i] @ z[j] / temperature - denominator for j in matches) / len(matches)
    return total


def test_contrastive_loss_matches_the_per_anchor_definition():
    torch.manual_seed(0)
    z = torch.randn(7, 5, requires_grad=True)
    keys = torch.tensor([0, 1, 0, 2, 1, 0, 3])  # keys 2 and 3 have no match: those anchors add nothing
    ours = contrastive_sum(z, keys, 0.2)
    assert ours.item() == pytest.approx(reference_supcon(z, keys, 0.2).item(), rel=1e-5)
    ours.backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    spec = TaskSpec(kind="retrieve", temperature=0.2)
    assert spec.count(torch.tensor([0, 1, 0, 2, 1, 0, 3, -1])) == 5
    # Unlabelled rows (-1) are left out of the loss: they are neither anchors nor negatives.
    with_missing = spec.loss(torch.cat([z, torch.randn(1, 5)]), torch.cat([keys, torch.tensor([-1])]))
    assert with_missing.item() == pytest.approx(ours.item(), rel=1e-6)


def test_retrieval_scores_by_hand():
    # Points on the unit circle at these angles; 0 and 1 match, 2 and 3 match, 4 matches nothing (it is not a
    # query, but stays in the gallery).
    angles = torch.deg2rad(torch.tensor([0.0, 30.0, 100.0, 175.0, 50.0]))
    points = torch.stack([angles.cos(), angles.sin()], dim=1)
    keys = torch.tensor([0, 0, 1, 1, 2])
    scores = retrieval_scores(points, keys)
    # Neighbours by angle: 0 -> 1, 4, 2, 3 (match 1st); 1 -> 4, 0, ... (2nd); 2 -> 4, 1, 3, 0 (3rd); 3 -> 2 (1st).
    assert scores["recall@1"] == pytest.approx(2 / 4)
    assert scores["map"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1) / 4)
    assert scores["recall@5"] == 1.0
    assert retrieval_scores(points, torch.tensor([0, 1, 2, 3, 4])) == {}
    # Six or seven points 10 degrees apart; only the two ends match, each the other's 5th or 6th neighbour.
    for n, recall5 in ((6, 1.0), (7, 0.0)):
        angles = torch.deg2rad(torch.arange(n) * 10.0)
        points = torch.stack([angles.cos(), angles.sin()], dim=1)
        far = retrieval_scores(points, torch.tensor([*range(n - 1), 0]))
        assert far == pytest.approx({"recall@1": 0.0, "recall@5": recall5, "map": 1 / (n - 1)})


def test_regression_loss_is_on_standardised_targets_and_skips_missing_labels():
    spec = TaskSpec(kind="regress", mean=4.0, std=2.0)
    y = torch.tensor([2.0, 6.0, math.nan, 5.0])
    perfect = ((torch.nan_to_num(y) - 4.0) / 2.0)[:, None]
    assert spec.loss(perfect, y).item() == 0.0
    out = torch.zeros(4, 1, requires_grad=True)
    loss = spec.loss(out, y)
    assert loss.item() == pytest.approx(1.0 + 1.0 + 0.25)
    loss.backward()
    assert torch.isfinite(out.grad).all() and out.grad[2].item() == 0.0
    assert spec.count(y) == 3
    # Predictions come back in the label's units; R² is 1 for them and 0 for always guessing the mean.
    assert spec.predict(perfect)[[0, 1, 3]].tolist() == [2.0, 6.0, 5.0]
    scores = spec.scores(spec.predict(perfect), y)
    assert scores["r2"] == pytest.approx(1.0) and scores["mae"] == 0.0
    guess = spec.scores(torch.full((4,), 13 / 3), y)
    assert guess["r2"] == pytest.approx(0.0, abs=1e-6)
    assert guess["mae"] == pytest.approx((7 / 3 + 5 / 3 + 2 / 3) / 3)
    assert guess["rmse"] == pytest.approx(math.sqrt((49 / 9 + 25 / 9 + 4 / 9) / 3))
    assert math.isnan(spec.scores(torch.ones(2), torch.ones(2))["r2"])  # no spread to explain
    assert spec.out_dim(8) == 1 and TaskSpec(kind="retrieve").out_dim(8) == 8
    small = torch.tensor([0.1, 0.3, 0.2])  # a spread under 1 still has an R²
    assert spec.scores(small, small)["r2"] == pytest.approx(1.0)


def test_label_dtypes_and_table_formats():
    assert TaskSpec(kind="regress").dtype() == torch.float32
    assert TaskSpec().dtype() == TaskSpec(kind="retrieve").dtype() == torch.long
    assert format_score("r2", 0.5) == "0.500" and format_score("mae", 1.25) == "1.250"
    assert format_score("accuracy", 0.5) == "50.0%" and format_score("recall@1", 1.0) == "100.0%"


def test_classification_loss_prediction_and_accuracy_skip_missing_labels():
    spec = TaskSpec(classes=["p", "q", "r"])
    assert spec.encode("q", {}) == 1 and spec.encode(None, {}) == -1 and spec.out_dim(8) == 3
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0], [5.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    y = torch.tensor([0, 1, -1, 2])
    expected = -sum(torch.log_softmax(logits[i], dim=0)[y[i]] for i in (0, 1, 3))
    assert spec.loss(logits, y).item() == pytest.approx(expected.item(), rel=1e-6)
    assert spec.seen(y).tolist() == [True, True, False, True] and spec.count(y) == 3
    assert spec.predict(logits).tolist() == [0, 2, 0, 2]
    assert spec.scores(spec.predict(logits), y) == {"accuracy": pytest.approx(2 / 3)}


def test_labels_are_encoded_per_kind_and_bad_ones_named():
    keys = {}
    retrieve = TaskSpec(kind="retrieve")
    assert [retrieve.encode(v, keys) for v in ["b", "a", "b", None]] == [0, 1, 0, -1]
    regress = TaskSpec(kind="regress")
    assert regress.encode("2.5", {}) == 2.5 and math.isnan(regress.encode(None, {}))
    for bad in ("tall", True, "nan"):
        with pytest.raises(ValueError, match="expected a number"):
            regress.encode(bad, {})
    with pytest.raises(ValueError, match="not one of the training classes"):
        TaskSpec(classes=["x"]).encode("y", {})
    with pytest.raises(ValueError, match="unknown task kind 'rank'"):
        TaskSpec(kind="rank")


def test_task_specs_read_the_training_file(tmp_path):
    rows = [{"id": i, "labels": {"age": a, "who": w}} for i, (a, w) in enumerate([(20, "x"), (30, "y"), ("?", "x")])]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    specs = task_specs(path, {"age": "regress", "who": "retrieve"})
    assert specs["age"].kind == "regress" and specs["age"].mean == 25.0  # "?" is left out (load_labelled skips it)
    assert specs["age"].std == pytest.approx(math.sqrt(50))
    assert specs["who"].kind == "retrieve" and specs["who"].classes == []
    assert task_specs(path)["age"].classes == ["20", "30", "?"]  # without a kind, a task classifies
    path.write_text(json.dumps({"id": 0, "labels": {"age": "old"}}) + "\n")
    with pytest.raises(ValueError, match="task age is kind=regress, but none of its labels is a number"):
        task_specs(path, {"age": "regress"})


def reference_retrieval(points, keys):
    """recall@1, recall@5 and mean average precision, one query at a time by the textbook definitions."""
    z = F.normalize(points, dim=-1)
    r1, r5, ap = [], [], []
    for i in range(len(z)):
        others = sorted((j for j in range(len(z)) if j != i), key=lambda j: -float(z[i] @ z[j]))
        hits = [int(keys[j] == keys[i]) for j in others]
        if not any(hits):
            continue
        r1.append(hits[0])
        r5.append(max(hits[:5]))
        found = [k + 1 for k, hit in enumerate(hits) if hit]  # the ranks of the matches
        ap.append(sum((n + 1) / rank for n, rank in enumerate(found)) / len(found))
    return {"recall@1": sum(r1) / len(r1), "recall@5": sum(r5) / len(r5), "map": sum(ap) / len(ap)}


def test_retrieval_task_scores_equal_the_textbook_definitions_with_several_matches_per_query():
    torch.manual_seed(0)
    points = torch.randn(14, 6)  # more points than dimensions, so rows and columns differ
    keys = torch.tensor([0, 1, 2, 0, 1, 0, 2, 3, 0, 1, 4, 2, 0, 1])  # key 3 and key 4 have no match
    spec = TaskSpec(kind="retrieve")
    unit = spec.predict(3.0 * points)
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(14))
    expected = reference_retrieval(points, keys)
    assert 0.0 < expected["recall@1"] < expected["recall@5"] < 1.0 and expected["map"] < expected["recall@5"]
    assert spec.scores(unit, keys) == pytest.approx(expected)
    with_missing = spec.scores(torch.cat([unit, unit[:1]]), torch.cat([keys, torch.tensor([-1])]))
    assert with_missing == pytest.approx(expected)  # an unlabelled row is neither a query nor in the gallery


def test_regression_keeps_negative_targets_and_a_single_labelled_sample_is_scored():
    spec = TaskSpec(kind="regress")
    y = torch.tensor([-3.0, math.nan, -0.5])
    assert spec.seen(y).tolist() == [True, False, True] and spec.count(y) == 2
    assert spec.scores(torch.tensor([-3.0, 0.0, -1.5]), y)["mae"] == pytest.approx(0.5)
    assert math.isnan(spec.scores(torch.zeros(2), torch.ones(2))["r2"])  # wrong, but no spread to explain
    assert TaskSpec(classes=["p", "q"]).scores(torch.tensor([1]), torch.tensor([1])) == {"accuracy": 1.0}
    assert format_score("rmse", 0.25) == "0.250"


def test_task_specs_round_trip_and_name_the_known_kinds():
    spec = TaskSpec(kind="regress", mean=2.5, std=0.5)
    assert TaskSpec(**spec.to_dict()) == spec and spec.to_dict()["std"] == 0.5
    with pytest.raises(ValueError, match="^unknown task kind 'rank'; known: classify, regress, retrieve$"):
        TaskSpec(kind="rank")


def test_match_matrix_and_contrastive_loss_stay_on_the_keys_device():
    # The meta device stands in for a GPU: an identity made on the CPU would not mix with it.
    keys = torch.tensor([0, 1, 0])
    assert match_matrix(keys).tolist() == [[False, False, True], [False, False, False], [True, False, False]]
    assert match_matrix(keys.to("meta")).device.type == "meta"
    assert contrastive_sum(torch.randn(3, 4, device="meta"), keys.to("meta"), 0.1).device.type == "meta"

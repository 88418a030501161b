import json

import pytest
from typer.testing import CliRunner

from mmalign.cli import app
from mmalign.config import ConfigError, resolve_recipe
from mmalign.fusion.compare import compare_fusion, compare_multitask
from mmalign.fusion.config import load_classifier_recipe
from mmalign.fusion.data import COLOURS, PITCHES, mix_label, task_specs, write_fusion_dataset
from mmalign.fusion.train import load_classifier, task_scores, train_classifier
from mmalign.modalities import get_modality

SMALL = ["model.encoders.image.config.hidden_size=32", "model.encoders.image.config.intermediate_size=64",
         "model.encoders.audio.config.dim=32", "model.fusion.dim=32", "train.batch_size=32"]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("fusion")
    write_fusion_dataset(out, n_train=400, n_test=120, seed=0, progress=False)
    return out


def accuracy(model, data, hide=()):
    return {t: s["accuracy"] for t, s in task_scores(model, data, hide).items()}


def recipe(data, out, *overrides):
    base = [f"data.train={data / 'train.jsonl'}", f"data.val={data / 'test.jsonl'}", f"train.out_dir={out}",
            "train.progress=false", "train.max_steps=150"]  # fmt: skip
    return load_classifier_recipe(resolve_recipe("classify_av"), base + SMALL + list(overrides))


def test_mix_labels_need_both_inputs(data):
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    # The label each record carries is the one its files determine: colour from the image, pitch from the sound.
    image, audio = get_modality("image"), get_modality("audio")
    for row in rows[:3]:
        assert image.load(data / row["image"]).size == (64, 64)
        assert audio.load(data / row["audio"]).ndim == 1
        assert row["labels"]["mix"] == mix_label(row["labels"]["colour"], row["labels"]["pitch"])
    # Knowing one input leaves every mix class possible in equal measure.
    for colour in COLOURS:
        assert sorted(mix_label(colour, p) for p in PITCHES) == ["a", "b", "c"]
    for pitch in PITCHES:
        assert sorted(mix_label(c, pitch) for c in COLOURS) == ["a", "a", "b", "b", "c", "c"]
    assert task_specs(data / "train.jsonl")["pitch"].classes == sorted(PITCHES)


def test_classifier_learns_both_single_modality_tasks_and_reloads(data, tmp_path):
    cfg = recipe(data, tmp_path / "run", "model.tasks={colour: {}, pitch: {}, mix: {}}",
                 "multitask.weighting=uncertainty", "model.modality_dropout=0.3")  # fmt: skip
    summary = train_classifier(cfg)
    assert summary["losses"]["colour"] < summary["first_losses"]["colour"] / 2
    objective = summary["objective"]
    acc = accuracy(objective.model, objective.val_data)
    assert acc["colour"] > 0.5 and acc["pitch"] > 0.6  # chance: 1/6 and 1/3
    # A missing modality still gets a prediction: pitch survives hiding the image, colour falls to ~chance.
    no_image = accuracy(objective.model, objective.val_data, hide=("image",))
    assert no_image["pitch"] > 0.6 and no_image["colour"] < 0.4
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"weight_colour", "weight_mix", "weight_pitch"} <= set(log[-2])  # the weighting is logged
    reloaded = load_classifier(tmp_path / "run")
    assert accuracy(reloaded, objective.val_data) == acc
    # A run folder from before task kinds keeps classes.json instead of tasks.json: it loads as classifiers.
    specs = json.loads((tmp_path / "run" / "tasks.json").read_text())
    (tmp_path / "run" / "classes.json").write_text(json.dumps({t: d["classes"] for t, d in specs.items()}))
    (tmp_path / "run" / "tasks.json").unlink()
    old = load_classifier(tmp_path / "run")
    expected = {t: ("classify", d["classes"]) for t, d in specs.items()}
    assert {t: (s.kind, s.classes) for t, s in old.specs.items()} == expected
    assert accuracy(old, objective.val_data) == acc


def test_regression_and_retrieval_heads_need_both_inputs_and_reload(data, tmp_path):
    cfg = recipe(data, tmp_path / "run", "model.tasks={total: {kind: regress}, pair: {kind: retrieve}}",
                 "train.max_steps=400")  # fmt: skip
    summary = train_classifier(cfg)
    objective = summary["objective"]
    model, val = objective.model, objective.val_data
    scores = task_scores(model, val)
    # total = shapes + beeps; pair = colour + pitch, matched by nearest held-out neighbour (chance ~1/18).
    assert scores["total"]["r2"] > 0.5 and scores["total"]["mae"] < 0.8
    assert scores["pair"]["recall@1"] > 0.8
    for hidden in ("image", "audio"):  # each input carries part of the answer
        alone = task_scores(model, val, hide=(hidden,))
        assert alone["total"]["r2"] < scores["total"]["r2"] - 0.2
        assert alone["pair"]["recall@1"] < 0.6
    assert summary["eval"]["val_total"] == scores["total"]["r2"] and "val_pair/map" in summary["eval"]
    reloaded = load_classifier(tmp_path / "run")
    assert reloaded.specs["total"].mean == model.specs["total"].mean
    assert task_scores(reloaded, val) == scores
    result = CliRunner().invoke(app, ["classify", "eval", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "total R²" in result.output and "pair R@1" in result.output


def test_bad_sample_is_skipped_with_its_id_and_counted(data, tmp_path):
    rows = (data / "train.jsonl").read_text().splitlines()
    broken = json.loads(rows[0]) | {"id": "broken-1", "audio": "audio/missing.wav"}
    unlabelled = json.loads(rows[1]) | {"id": "odd-label", "labels": {"colour": "red", "pitch": "ultrasonic"}}
    not_a_number = json.loads(rows[2]) | {"id": "no-total", "labels": {"total": "many"}}
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join([json.dumps(broken), *rows[3:], json.dumps(unlabelled), json.dumps(not_a_number)]))
    cfg = recipe(data, tmp_path / "run", f"data.train={train}", f"data.folder={data}", "train.max_steps=2",
                 "model.tasks={mix: {}, total: {kind: regress}}")  # fmt: skip
    train_classifier(cfg)
    skipped = [json.loads(line) for line in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    assert [s["id"] for s in skipped] == ["broken-1", "no-total"]
    assert "missing.wav" in skipped[0]["error"]
    assert "label total='many': expected a number" in skipped[1]["error"]
    cfg.data.on_error = "raise"
    with pytest.raises(ValueError, match="sample broken-1"):
        train_classifier(cfg)


def test_config_errors_name_the_problem(data, tmp_path):
    with pytest.raises(ConfigError, match="gradnorm needs a shared representation"):
        recipe(data, tmp_path, "multitask.weighting=gradnorm", "model.sharing=soft")
    with pytest.raises(ValueError, match="model.tasks names \\['mood'\\]"):
        train_classifier(recipe(data, tmp_path, "model.tasks={mood: {}}"))


def test_fusion_comparison_fuses_and_one_modality_stays_near_chance(data, tmp_path):
    res = compare_fusion(data, tmp_path, steps=250, methods=["product"], progress=False, overrides=SMALL)
    rows = res["rows"]
    assert set(rows) == {"audio only", "image only", "product"}
    assert rows["product"]["score"]["mix"] > 0.6
    for only in ("audio only", "image only"):
        assert rows[only]["score"]["mix"] < 0.45  # chance is 1/3
    assert json.loads((tmp_path / "results.json").read_text())["rows"]["product"]["parameters"] > 0


def test_multitask_comparison_runs_every_setup_on_the_same_data(data, tmp_path):
    res = compare_multitask(data, tmp_path, steps=60, mix_samples=50, setups=["single-task", "soft"],
                            progress=False, overrides=SMALL)  # fmt: skip
    single, soft = res["rows"]["single-task"], res["rows"]["soft"]
    assert set(single["score"]) == set(soft["score"]) == {"colour", "pitch", "mix"}
    assert single["parameters"] == soft["parameters"]  # three towers either way; soft adds only the penalty
    assert soft["score"]["pitch"] > 0.5
    with pytest.raises(ValueError, match="unknown setup"):
        compare_multitask(data, tmp_path, setups=["nope"])


def test_cli_classify_train_prints_accuracy_per_task(data, tmp_path):
    args = ["classify", "train", "classify_av", f"data.train={data / 'train.jsonl'}", f"data.val={data / 'test.jsonl'}",
            f"train.out_dir={tmp_path / 'run'}", "train.max_steps=3", "train.progress=false", *SMALL]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "without audio" in result.output and "mix" in result.output
    result = CliRunner().invoke(app, ["classify", "eval", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "without image" in result.output

"""The command line as a user drives it: help text, data, train with overrides, eval, generate, export/import."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmalign.cli import app

runner = CliRunner()
COMMANDS = ["quickstart", "data", "pretrain", "contrastive", "bind", "train", "eval", "generate", "export", "import"]


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command):
    out = invoke(command, "--help")
    assert "Usage" in out and "--help" in out


def test_train_help_documents_config_keys():
    out = invoke("train", "--help")
    for key in ("train.lr", "train.finetune", "data.on_error", "model.media.<modality>.connector.name"):
        assert key in out


def test_data_writes_a_llava_dataset(tmp_path):
    invoke("data", "--out", tmp_path, "--n-train", 5, "--n-val", 1, "--n-test", 1)
    convs = json.loads((tmp_path / "conversations_train.json").read_text())
    assert len(convs) == 5 and convs[0]["conversations"][0]["from"] == "human"
    assert (tmp_path / "images" / convs[0]["image"]).is_file()
    assert (tmp_path / "tokenizer" / "tokenizer.json").is_file()
    episodes = (tmp_path / "interleaved_train.jsonl").read_text().splitlines()
    assert len(episodes) == 8000 and all(2 <= len(json.loads(e)["image_info"]) <= 5 for e in episodes[:50])


def test_train_eval_generate_export_import(tmp_path, shapes, tiny_hf_llava):
    # Start from an imported tiny HF Llava, then fine-tune it with the CLI and use the result.
    base = tmp_path / "base"
    invoke("import", tiny_hf_llava, "--out", base)
    run = tmp_path / "run"
    out = invoke(
        "train", "shapes_stage2",
        f"model.media.image.encoder.path={base / 'encoder'}", f"model.llm.path={base / 'llm'}",
        "model.media.image.encoder.feature_layer=-2",
        f"data.train={shapes['conversations']}", f"data.val={shapes['val']}", f"data.image_folder={shapes['images']}",
        f"train.out_dir={run}", f"train.init_from={base}", "train.max_steps=3", "train.batch_size=4",
        "train.progress=false", "data.blank_media_prob=0",
    )  # fmt: skip
    assert '"steps": 3' in out
    out = invoke(
        "eval", run, "--data", shapes["test"], "--image-folder", shapes["images"], "--output", tmp_path / "e.json"
    )
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["n"] == 20 and set(result["by_type"]) == {"color", "shape", "size", "count", "position"}
    assert "position" in out
    untyped = [
        {k: v for k, v in r.items() if k != "question_type"} for r in json.loads(Path(shapes["test"]).read_text())
    ]
    (tmp_path / "untyped.json").write_text(json.dumps(untyped))
    out = invoke("eval", run, "--data", tmp_path / "untyped.json", "--image-folder", shapes["images"])
    assert [line.split()[1] for line in out.splitlines() if line.startswith("│")] == ["all"]  # one row, not two
    image = f"{shapes['images']}/test_00000.png"
    out = invoke("generate", run, "--image", image, "--prompt", "what color is the shape ?", "--max-new-tokens", 3)
    expected = _library_answer(run, image, "<image>\nwhat color is the shape ?")
    assert out.strip() == (expected or "(empty answer: the model stopped at once)")
    invoke("export", run, "--out", tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").is_file()
    invoke("import", tmp_path / "hf", "--out", tmp_path / "back")
    assert (tmp_path / "back" / "model.safetensors").is_file()


def _library_answer(run, image, prompt):
    from mmalign.data.processor import Conversation, processor_for
    from mmalign.generate import generate
    from mmalign.train.checkpoint import load_checkpoint, load_train_config

    model, tok, _ = load_checkpoint(run)
    proc = processor_for(model, tok, load_train_config(run).data)
    conv = Conversation(id="q", media={"image": [image]}, messages=[{"role": "user", "content": prompt}])
    out = generate(model, [proc.prompt_ids(conv)], proc.media(conv), pad_id=tok.pad_token_id,
                   stop_ids=[tok.eos_token_id], max_new_tokens=3)[0]  # fmt: skip
    return tok.decode(out, skip_special_tokens=True).strip()


def test_unknown_override_fails_with_the_key(tmp_path):
    result = runner.invoke(app, ["train", "shapes_stage1", "train.lrr=1"])
    assert result.exit_code != 0
    assert "train.lrr" in str(result.exception)


def test_the_command_prints_a_key_error_as_one_unquoted_line(monkeypatch, capsys):
    from mmalign import cli

    monkeypatch.setattr("sys.argv", ["mmalign", "train", "shapes_stage1", "train.lrr=1"])
    with pytest.raises(SystemExit) as stop:
        cli.main()
    out = " ".join(capsys.readouterr().out.split())
    assert stop.value.code == 1
    assert "error: unknown config key 'train.lrr' (KeyError" in out  # not the repr's outer quotes


def test_data_writes_either_embedded_dataset(tmp_path):
    out = invoke("data", "--dataset", "glyphs", "--out", tmp_path / "g", "--n-train", 4, "--n-val", 1, "--n-test", 1)
    records = json.loads((tmp_path / "g" / "qa_test.json").read_text())
    assert '"scenes"' in out and len(records) == 6  # one question per type for the one test image
    assert not (tmp_path / "g" / "tokenizer").exists()
    result = runner.invoke(app, ["data", "--dataset", "faces", "--out", str(tmp_path / "f")])
    assert result.exit_code != 0 and "unknown dataset 'faces'" in result.output

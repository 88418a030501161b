"""The embedded multimodal data: every modality's real files load back through the one data path into tensors of
the shape its tokenizer takes, the questions cover every type, and the projector family's token encoder wraps a
modality's tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from mmalign.config import DataConfig, EncoderConfig, LLMConfig, MediaConfig, ModelConfig, OneLLMConfig
from mmalign.data.dataset import Collator, ConversationDataset
from mmalign.data.multimodal import synthetic_modalities, write_multimodal_dataset
from mmalign.data.processor import processor_for, read_records
from mmalign.modalities import get_modality
from mmalign.models.builder import build_model
from mmalign.models.token_encoder import TokenEncoder, token_encoder


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory):
    return write_multimodal_dataset(tmp_path_factory.mktemp("mm"), n_train=6, n_test=3, seed=0, progress=False)


def test_every_modality_is_written_with_all_question_types(multimodal):
    assert set(multimodal["modalities"]) == set(synthetic_modalities())
    assert {"image", "point", "imu"} <= set(multimodal["modalities"])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(multimodal["tokenizer"])
    for m, files in multimodal["modalities"].items():
        synth, key = get_modality(m).synthetic, get_modality(m).record_key
        test = read_records(files["test"])
        assert len(test) == 3 * len(synth.questions)
        assert {r["question_type"] for r in test} == set(synth.questions)
        convs = read_records(files["conversations"])
        assert len(convs) == 6 and all(r[key].startswith(f"{m}/train_") for r in convs)
        answers = [t["value"] for r in convs + test for t in r["conversations"] if t["from"] == "gpt"]
        assert tok.unk_token_id not in tok(" ".join(answers))["input_ids"]  # every answer word is in the vocabulary


def test_every_modality_loads_through_the_one_data_path(multimodal, base):
    media = {m: MediaConfig() for m in multimodal["modalities"]}
    cfg = ModelConfig(
        family="onellm",
        media=media,
        llm=LLMConfig(path=str(base / "lm")),
        onellm=OneLLMConfig(encoder=EncoderConfig(path=str(base / "encoder"), feature_layer=-1, keep_cls=True),
                            num_queries=3, expert_heads=2),
    )  # fmt: skip
    model, tok = build_model(cfg)
    data = DataConfig(image_folder=multimodal["folder"], template="chat")
    processor = processor_for(model, tok, data)
    files = [f["conversations"] for f in multimodal["modalities"].values()]
    ds = ConversationDataset(files, multimodal["folder"], processor)
    batch = Collator(tok.pad_token_id)([ds[i] for i in range(len(ds))])
    assert not batch["errors"]
    assert set(batch["media"]) == set(multimodal["modalities"])
    for m, x in batch["media"].items():
        assert len(x) == 6 and torch.isfinite(x).all()
        tokens = model.encoders[m](x)
        assert tokens.shape == (6, model.encoders[m].num_tokens, model.universal.hidden_size)
    with torch.no_grad():
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"], media=batch["media"],
                    labels=batch["labels"])  # fmt: skip
    assert torch.isfinite(out["loss_sum"]) and out["loss_sum"] > 0


def test_a_file_of_the_wrong_modality_is_named_in_the_error(multimodal, base, tmp_path):
    folder = multimodal["folder"]
    record = json.loads(open(multimodal["modalities"]["point"]["conversations"]).read())[0]
    record["point"] = read_records(multimodal["modalities"]["imu"]["conversations"])[0]["imu"]  # a CSV, not a cloud
    (tmp_path / "bad.json").write_text(json.dumps([record]))
    cfg = ModelConfig(
        family="onellm",
        media={"point": MediaConfig()},
        llm=LLMConfig(path=str(base / "lm")),
        onellm=OneLLMConfig(encoder=EncoderConfig(path=str(base / "encoder"), feature_layer=-1, keep_cls=True),
                            num_queries=3, expert_heads=2),
    )  # fmt: skip
    model, tok = build_model(cfg)
    processor = processor_for(model, tok, DataConfig(image_folder=folder, template="chat"))
    item = ConversationDataset(str(tmp_path / "bad.json"), folder, processor)[0]
    assert item["id"] == record["id"] and "point" in item["error"] and "imu/train_00000.csv" in item["error"]


def test_the_token_encoder_wraps_a_modality_tokenizer_and_reloads(tmp_path):
    torch.manual_seed(0)
    encoder = token_encoder(modality="point", config={"dim": 32, "depth": 1, "heads": 2})
    assert encoder.num_points == 256  # the tokenizer's preprocessing settings read through the encoder
    x = torch.randn(3, 256, 3)
    feats = encoder(x)
    assert feats.shape == (3, encoder.num_tokens, 32)
    encoder.save(tmp_path / "enc")
    again = token_encoder(modality="point", path=str(tmp_path / "enc"))
    assert torch.equal(again(x), feats)
    with pytest.raises(ValueError, match="holds a point encoder, not a imu one"):
        token_encoder(modality="imu", path=str(tmp_path / "enc"))
    with pytest.raises(TypeError):
        TokenEncoder("point", tokenizer={"num_pionts": 100})


def test_the_data_command_writes_chosen_modalities(tmp_path):
    from typer.testing import CliRunner

    from mmalign.cli import app

    out = tmp_path / "mm"
    res = CliRunner().invoke(app, ["data", "--dataset", "multimodal", "--modalities", "point,imu", "--out", str(out),
                                   "--n-train", "4", "--n-test", "2"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["imu", "point", "tokenizer"]
    assert len(read_records(out / "point_conversations_train.json")) == 4
    res = CliRunner().invoke(app, ["data", "--dataset", "multimodal", "--modalities", "smell", "--out", str(out)])
    assert res.exit_code != 0 and "smell" in str(res.exception)

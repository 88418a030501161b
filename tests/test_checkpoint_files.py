"""The step stamped into a weights file, and a corrupt one named with its reader's error."""

import re

import pytest
import torch
from safetensors.torch import save_file

from mmalign.errors import CheckpointError
from mmalign.train.checkpoint import WEIGHTS, weights_step


def test_weights_step_reads_the_stamp_and_names_a_corrupt_file(tmp_path):
    path = tmp_path / WEIGHTS
    save_file({"w": torch.zeros(64)}, path, metadata={"format": "pt", "step": "12"})
    assert weights_step(tmp_path) == 12
    save_file({"w": torch.zeros(64)}, path, metadata={"format": "pt"})
    assert weights_step(tmp_path) is None
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: cannot be read \(SafetensorError: .+\); "):
        weights_step(tmp_path)


def test_load_checkpoint_puts_the_model_on_the_device_asked_for_in_eval_mode(shapes, tmp_path):
    from helpers import tiny_model_config
    from mmalign.models.builder import build_model
    from mmalign.train.checkpoint import load_checkpoint, save_checkpoint

    cfg = tiny_model_config(shapes["tokenizer"])
    model, tok = build_model(cfg)
    save_checkpoint(tmp_path / "ckpt", model.train(), tok, cfg)
    for device in ("cpu", "meta"):  # meta stands in for a GPU
        loaded, _, _ = load_checkpoint(tmp_path / "ckpt", device=device)
        assert {p.device.type for p in loaded.parameters()} == {device}
        assert not any(m.training for m in loaded.modules())


class TiedPair(torch.nn.Module):
    """An embedding and a head sharing one weight, plus four weights of a group nothing else would load."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(6, 4)
        self.head = torch.nn.Linear(4, 6, bias=False)
        self.head.weight = self.embed.weight
        self.norms = torch.nn.ModuleList([torch.nn.LayerNorm(4), torch.nn.LayerNorm(4)])

    def param_groups(self):
        return {"llm": torch.nn.ModuleList([self.embed, self.head]), "norms": self.norms}


def test_load_weights_takes_a_tied_weight_under_either_name_and_names_what_is_missing(tmp_path):
    from mmalign.train.checkpoint import load_weights

    source, required = TiedPair(), {"llm", "norms"}
    norms = {k: v for k, v in source.state_dict().items() if k.startswith("norms.")}
    for name in ("embed.weight", "head.weight"):  # safetensors keeps one name of a tied pair; either may be saved
        save_file({name: source.embed.weight.detach().clone(), **norms}, tmp_path / WEIGHTS)
        model = TiedPair()
        assert sorted(load_weights(model, tmp_path, required=required)) == sorted([name, *norms])
        assert torch.equal(model.head.weight, source.embed.weight) and model.head.weight is model.embed.weight
        assert torch.equal(model.norms[1].bias, source.norms[1].bias)
    loaded = TiedPair()
    load_weights(loaded, tmp_path / WEIGHTS, required=required)  # the file itself, not its folder
    assert torch.equal(loaded.embed.weight, source.embed.weight)

    save_file({"embed.weight": source.embed.weight.detach().clone()}, tmp_path / WEIGHTS)
    message = f"{tmp_path}: 4 required weights are missing, e.g. ['norms.0.weight', 'norms.0.bias', 'norms.1.weight']"
    with pytest.raises(KeyError, match=re.escape(message)):
        load_weights(TiedPair(), tmp_path, required=required)
    assert load_weights(TiedPair(), tmp_path, required={"llm"}) == ["embed.weight"]
    extra = {f"extra.{i}": torch.zeros(1) for i in range(4)}
    save_file({"embed.weight": source.embed.weight.detach().clone(), **extra}, tmp_path / WEIGHTS)
    message = f"{tmp_path}: 4 weights do not fit this model, e.g. ['extra.0', 'extra.1', 'extra.2']"
    with pytest.raises(KeyError, match=re.escape(message)):
        load_weights(TiedPair(), tmp_path)
    missing = tmp_path / "elsewhere"
    with pytest.raises(FileNotFoundError, match=re.escape(f"{missing}: no such weights file; is {tmp_path} a")):
        load_weights(TiedPair(), missing)


def test_reloadable_groups_are_the_parts_with_a_path_of_their_own(shapes):
    from helpers import tiny_model_config
    from mmalign.config import EncoderConfig
    from mmalign.train.checkpoint import reloadable_groups

    cfg = tiny_model_config(shapes["tokenizer"])
    assert reloadable_groups(cfg) == set()  # everything built from a config: the checkpoint holds it all
    cfg.media["image"].encoder.path, cfg.llm.path = "towers/clip", "lm"
    assert reloadable_groups(cfg) == {"encoder.image", "llm"}
    cfg.media["image"].extra_encoders = [EncoderConfig(name="siglip")]  # one fused tower without a path
    assert reloadable_groups(cfg) == {"llm"}
    cfg.family = "onellm"  # one universal encoder, reloadable only when it has a path
    assert reloadable_groups(cfg) == {"llm"}
    cfg.onellm.encoder.path = "towers/clip"
    assert reloadable_groups(cfg) == {"encoder", "llm"}

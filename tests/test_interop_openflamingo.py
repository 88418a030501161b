"""An OpenFlamingo checkpoint (its state-dict layout, built tiny here) imports into the flamingo family: the
resampler and each block compute what OpenFlamingo's modules compute (written out below from its equations),
the blocks keep OpenFlamingo's placement, and the embedding rows keep their token ids."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionConfig, CLIPVisionModel, LlamaConfig

from helpers import TINY_LLAMA, TINY_VISION
from mmalign.config import EncoderConfig, FlamingoConfig, LLMConfig, MediaConfig, ModelConfig
from mmalign.interop.openflamingo import import_openflamingo
from mmalign.models.xattn import MediaContext
from mmalign.train.checkpoint import load_checkpoint

HEADS, DIM_HEAD, LATENTS, DEPTH, MULT = 2, 8, 4, 2, 4
D = 32  # vision and LM width of the tiny models


@pytest.fixture(scope="module")
def base(tmp_path_factory, shapes) -> ModelConfig:
    """The releases an OpenFlamingo checkpoint builds on: a CLIP tower and a Llama with its tokenizer."""
    root = tmp_path_factory.mktemp("of_base")
    CLIPVisionModel(CLIPVisionConfig(**TINY_VISION)).save_pretrained(root / "clip")
    tok = AutoTokenizer.from_pretrained(shapes["tokenizer"])
    llm = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"} | {"num_hidden_layers": 4}
    AutoModelForCausalLM.from_config(LlamaConfig(**llm, vocab_size=len(tok))).save_pretrained(root / "llm")
    tok.save_pretrained(root / "llm")
    return ModelConfig(
        family="flamingo",
        media={"image": MediaConfig(encoder=EncoderConfig(path=str(root / "clip"), feature_layer=-1))},
        llm=LLMConfig(path=str(root / "llm")),
        flamingo=FlamingoConfig(
            resampler_heads=HEADS, resampler_dim_head=DIM_HEAD, xattn_heads=HEADS, xattn_dim_head=DIM_HEAD
        ),
    )


def _r(*shape):
    return torch.randn(*shape) * 0.2


def _norm(prefix):
    return {f"{prefix}.weight": 1 + _r(D), f"{prefix}.bias": _r(D)}


def _ff(prefix):
    return {**_norm(f"{prefix}.0"), f"{prefix}.1.weight": _r(MULT * D, D), f"{prefix}.3.weight": _r(D, MULT * D)}


def openflamingo_state(vocab: int, blocks=(1, 3)) -> dict:
    """What OpenFlamingo's `get_checkpoint` saves for a 4-layer Llama with cross_attn_every_n_layers=2."""
    inner = HEADS * DIM_HEAD
    state = {"perceiver.latents": _r(LATENTS, D), **_norm("perceiver.norm")}
    for i in range(DEPTH):
        p = f"perceiver.layers.{i}"
        state |= _norm(f"{p}.0.norm_media") | _norm(f"{p}.0.norm_latents") | _ff(f"{p}.1")
        state |= {f"{p}.0.to_q.weight": _r(inner, D), f"{p}.0.to_kv.weight": _r(2 * inner, D)}
        state[f"{p}.0.to_out.weight"] = _r(D, inner)
    for i in blocks:
        p = f"lang_encoder.model.layers.{i}.gated_cross_attn_layer"
        state |= _norm(f"{p}.attn.norm") | _ff(f"{p}.ff")
        state |= {f"{p}.attn.to_q.weight": _r(inner, D), f"{p}.attn.to_kv.weight": _r(2 * inner, D)}
        state |= {f"{p}.attn.to_out.weight": _r(D, inner), f"{p}.attn_gate": torch.tensor([0.7])}
        state[f"{p}.ff_gate"] = torch.tensor([-0.4])
    state["lang_encoder.model.embed_tokens.weight"] = _r(vocab, D)
    state["lang_encoder.lm_head.weight"] = _r(vocab, D)
    return state


# ---- OpenFlamingo's equations (helpers.py: PerceiverAttention, MaskedCrossAttention, FeedForward), written out
def _ln(x, p, name):
    return F.layer_norm(x, (D,), p[f"{name}.weight"], p[f"{name}.bias"])


def _of_ff(x, p, name):
    return F.gelu(_ln(x, p, f"{name}.0") @ p[f"{name}.1.weight"].T) @ p[f"{name}.3.weight"].T


def _heads(x):
    return x.unflatten(-1, (HEADS, DIM_HEAD)).transpose(1, 2)


def _attend(q, k, v, mask=None):
    sim = (q * DIM_HEAD**-0.5) @ k.transpose(-1, -2)
    if mask is not None:
        sim = sim.masked_fill(~mask, -torch.finfo(sim.dtype).max)
    attn = (sim - sim.amax(dim=-1, keepdim=True)).softmax(dim=-1)
    return attn, v


def of_perceiver(p, x):
    latents = p["perceiver.latents"].expand(x.shape[0], -1, -1)
    for i in range(DEPTH):
        a = f"perceiver.layers.{i}.0"
        xm, lat = _ln(x, p, f"{a}.norm_media"), _ln(latents, p, f"{a}.norm_latents")
        k, v = (torch.cat([xm, lat], dim=1) @ p[f"{a}.to_kv.weight"].T).chunk(2, dim=-1)
        attn, v = _attend(_heads(lat @ p[f"{a}.to_q.weight"].T), _heads(k), _heads(v))
        latents = (attn @ v).transpose(1, 2).flatten(2) @ p[f"{a}.to_out.weight"].T + latents
        latents = _of_ff(latents, p, f"perceiver.layers.{i}.1") + latents
    return _ln(latents, p, "perceiver.norm")


def of_block(p, x, media, media_locations):
    text_time = media_locations.cumsum(-1)  # (B, T)
    media_time = torch.arange(media.shape[1]) + 1
    k, v = (media.flatten(1, 2) @ p["attn.to_kv.weight"].T).chunk(2, dim=-1)
    q = _heads(_ln(x, p, "attn.norm") @ p["attn.to_q.weight"].T)
    mask = (text_time[..., None] == media_time).repeat_interleave(media.shape[2], dim=-1)[:, None]  # (B,1,T,M*L)
    attn, v = _attend(q, _heads(k), _heads(v), mask)
    attn = attn.masked_fill((text_time == 0)[:, None, :, None], 0.0)
    x = ((attn @ v).transpose(1, 2).flatten(2) @ p["attn.to_out.weight"].T) * p["attn_gate"].tanh() + x
    return _of_ff(x, p, "ff") * p["ff_gate"].tanh() + x


def test_openflamingo_checkpoint_imports_exactly(base, tmp_path):
    tok = AutoTokenizer.from_pretrained(base.llm.path)
    state = openflamingo_state(vocab=len(tok) + 1)  # OpenFlamingo added <|endofchunk|> (<image> exists already)
    torch.save(state, tmp_path / "checkpoint.pt")
    model, tokenizer, cfg = load_checkpoint(import_openflamingo(tmp_path / "checkpoint.pt", base, tmp_path / "ours"))

    assert (cfg.flamingo.xattn_placement, cfg.flamingo.cross_attn_every_n_layers) == ("last", 2)
    assert sorted(map(int, model.xattn)) == [1, 3]  # OpenFlamingo's layout kept, not moved to the paper's
    assert tokenizer.convert_tokens_to_ids("<|endofchunk|>") == len(tok)  # the id OpenFlamingo gave it

    features = torch.randn(3, 10, D)
    with torch.no_grad():
        torch.testing.assert_close(model.connectors["image"](features), of_perceiver(state, features))

    ids = torch.randint(10, 60, (2, 9))
    image = tokenizer.convert_tokens_to_ids("<image>")
    ids[0, 1] = ids[0, 5] = ids[1, 6] = image
    media_locations = ids == image
    media = torch.randn(2, 2, LATENTS, D)
    x = torch.randn(2, 9, D)
    context = MediaContext(media=media, media_time=media_locations.long().cumsum(1))
    for i in (1, 3):
        prefix = f"lang_encoder.model.layers.{i}.gated_cross_attn_layer."
        block_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        with torch.no_grad():
            torch.testing.assert_close(
                model.xattn[str(i)](x, context, i), of_block(block_state, x, media, media_locations)
            )

    embed = state["lang_encoder.model.embed_tokens.weight"]
    torch.testing.assert_close(model.llm.get_input_embeddings().weight, embed)
    eoc = tokenizer.convert_tokens_to_ids("<|endofchunk|>")
    torch.testing.assert_close(model.new_tokens.embed, embed[[image, eoc]])  # the trainable rows start from them


def test_openflamingo_import_refuses_a_mismatched_base(base, tmp_path):
    tok = AutoTokenizer.from_pretrained(base.llm.path)
    torch.save(openflamingo_state(vocab=len(tok) + 5), tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="trained on"):
        import_openflamingo(tmp_path / "checkpoint.pt", base, tmp_path / "ours")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an OpenFlamingo state dict"):
        import_openflamingo(tmp_path / "other.pt", base, tmp_path / "ours2")
    torch.save(openflamingo_state(vocab=len(tok) + 1, blocks=(0, 1, 3)), tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="not every n-th layer"):
        import_openflamingo(tmp_path / "odd.pt", base, tmp_path / "ours3")


def test_cli_imports_an_openflamingo_checkpoint(base, tmp_path):
    from typer.testing import CliRunner

    from mmalign.cli import app
    from mmalign.config import RecipeConfig, save_yaml

    tok = AutoTokenizer.from_pretrained(base.llm.path)
    torch.save(openflamingo_state(vocab=len(tok) + 1), tmp_path / "checkpoint.pt")
    save_yaml(RecipeConfig(model=base), tmp_path / "base.yaml")
    args = ["import", tmp_path / "checkpoint.pt", "--format", "openflamingo", "--out", tmp_path / "ours"]
    runner = CliRunner()
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code != 0 and "--base" in result.output  # no encoder or LM named: refused, clearly
    result = runner.invoke(app, [str(a) for a in [*args, "--base", tmp_path / "base.yaml"]])
    assert result.exit_code == 0, result.output + repr(result.exception)
    model, _, cfg = load_checkpoint(tmp_path / "ours")
    assert cfg.flamingo.xattn_placement == "last" and sorted(map(int, model.xattn)) == [1, 3]

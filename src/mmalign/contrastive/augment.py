"""Image augmentation for contrastive views on tensors (no torchvision), reproducible through a torch.Generator.

Every function takes a float image (C, H, W) or batch (B, C, H, W), draws one set of random parameters per image
from `generator` (on the CPU, so the stream does not depend on the device), and returns the same shape and dtype.
Values are not clamped, so the ops also apply to mean/std-normalised images.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

# ITU-R BT.601 luma weights, the usual greyscale for RGB (as in PIL's convert("L")).
_LUMA = (0.299, 0.587, 0.114)


def _as_batch(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply fn to a (B, C, H, W) float32/float64 view of x and restore x's rank and dtype."""
    if x.ndim not in (3, 4) or not x.is_floating_point():
        raise TypeError(f"expected a float (C, H, W) or (B, C, H, W) image, got {x.dtype} {tuple(x.shape)}")
    work = x if x.ndim == 4 else x.unsqueeze(0)
    # grid_sample and friends lack half kernels on CPU; compute in float32 and cast back.
    if work.dtype not in (torch.float32, torch.float64):
        work = work.float()
    out = fn(work).to(x.dtype)
    return out if x.ndim == 4 else out.squeeze(0)


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return (low + (high - low) * torch.rand(n, generator=generator)).to(device)


def random_resized_crop(
    x: torch.Tensor,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Crop a random box of area fraction in `scale` and aspect (w/h) in `ratio` (log-uniform), resized back to
    (H, W) with bilinear sampling. (C, H, W) or (B, C, H, W) -> same shape.

    As in Inception-style cropping, up to 10 draws per image are tried; an image with no fitting draw keeps its
    full frame. Box corners are continuous, which grid_sample handles without rounding.
    """

    def crop(xb: torch.Tensor) -> torch.Tensor:
        b, _, h, w = xb.shape
        tries = 10
        area = scale[0] + (scale[1] - scale[0]) * torch.rand(b, tries, generator=generator, dtype=torch.float64)
        log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
        aspect = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(b, tries, generator=generator, dtype=torch.float64))
        cw = torch.sqrt(area * aspect) * w  # box width in pixels; cw * ch = area * h * w and cw / ch = aspect * w / h
        ch = torch.sqrt(area / aspect) * h
        fits = (cw <= w) & (ch <= h)
        first = fits.to(torch.int8).argmax(dim=1)  # index of the first fitting draw (0 if none fits)
        any_fit = fits.any(dim=1)
        rows = torch.arange(b)
        cw = torch.where(any_fit, cw[rows, first], torch.full((b,), float(w), dtype=torch.float64))
        ch = torch.where(any_fit, ch[rows, first], torch.full((b,), float(h), dtype=torch.float64))
        x0 = (w - cw) * torch.rand(b, generator=generator, dtype=torch.float64)
        y0 = (h - ch) * torch.rand(b, generator=generator, dtype=torch.float64)
        # affine_grid maps output coords in [-1, 1] (pixel edges, align_corners=False) to input coords: the box
        # [x0, x0 + cw] in edge coordinates has centre 2 (x0 + cw/2) / W - 1 and half-width cw / W.
        theta = torch.zeros(b, 2, 3, dtype=torch.float64)
        theta[:, 0, 0] = cw / w
        theta[:, 0, 2] = 2 * (x0 + cw / 2) / w - 1
        theta[:, 1, 1] = ch / h
        theta[:, 1, 2] = 2 * (y0 + ch / 2) / h - 1
        grid = F.affine_grid(theta.to(xb), list(xb.shape), align_corners=False)
        return F.grid_sample(xb, grid, mode="bilinear", padding_mode="border", align_corners=False)

    return _as_batch(x, crop)


def random_flip(x: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image left-right with probability p. (C, H, W) or (B, C, H, W) -> same shape."""

    def flip(xb: torch.Tensor) -> torch.Tensor:
        mask = (torch.rand(xb.shape[0], generator=generator) < p).to(xb.device)
        return torch.where(mask[:, None, None, None], xb.flip(-1), xb)

    return _as_batch(x, flip)


def _grey(xb: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 1, H, W) luma for RGB, channel mean otherwise."""
    if xb.shape[1] == 3:
        weights = torch.tensor(_LUMA, dtype=xb.dtype, device=xb.device)
        return (xb * weights[None, :, None, None]).sum(dim=1, keepdim=True)
    return xb.mean(dim=1, keepdim=True)


def color_jitter(
    x: torch.Tensor,
    brightness: float = 0.0,
    contrast: float = 0.0,
    saturation: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Scale brightness, contrast and saturation by factors drawn uniformly from [1 - s, 1 + s] per image, in that
    fixed order (a fixed order keeps the random stream simple; the order matters little for small factors).
    Contrast blends with the image's mean grey level, saturation with each pixel's grey. Same shape as x."""

    def jitter(xb: torch.Tensor) -> torch.Tensor:
        b, dev = xb.shape[0], xb.device
        fb = _uniform(b, 1 - brightness, 1 + brightness, generator, dev).to(xb.dtype)[:, None, None, None]
        fc = _uniform(b, 1 - contrast, 1 + contrast, generator, dev).to(xb.dtype)[:, None, None, None]
        fs = _uniform(b, 1 - saturation, 1 + saturation, generator, dev).to(xb.dtype)[:, None, None, None]
        out = xb * fb
        mean = _grey(out).mean(dim=(2, 3), keepdim=True)
        out = (out - mean) * fc + mean
        grey = _grey(out)
        return (out - grey) * fs + grey

    return _as_batch(x, jitter)


def gaussian_noise(x: torch.Tensor, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Add i.i.d. N(0, std^2) noise to every value. Same shape as x."""

    def noise(xb: torch.Tensor) -> torch.Tensor:
        return xb + std * torch.randn(xb.shape, generator=generator, dtype=xb.dtype).to(xb.device)

    return _as_batch(x, noise)


class Augment:
    """crop -> flip -> colour jitter -> noise, with its own generator seeded at construction.

    Successive calls continue the same random stream, so two calls on one batch give two different views (as
    contrastive pretraining wants) while a fresh Augment with the same seed replays the same sequence.
    """

    def __init__(
        self,
        seed: int = 0,
        crop_scale: tuple[float, float] | None = (0.6, 1.0),
        flip: bool = True,
        jitter: float = 0.2,
        noise: float = 0.02,
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.crop_scale = crop_scale
        self.crop_ratio = crop_ratio
        self.flip = flip
        self.jitter = jitter
        self.noise = noise

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(C, H, W) or (B, C, H, W) float image -> augmented view of the same shape and dtype."""
        g = self.generator
        if self.crop_scale is not None:
            x = random_resized_crop(x, self.crop_scale, self.crop_ratio, generator=g)
        if self.flip:
            x = random_flip(x, 0.5, generator=g)
        if self.jitter > 0:
            x = color_jitter(x, self.jitter, self.jitter, self.jitter, generator=g)
        if self.noise > 0:
            x = gaussian_noise(x, self.noise, generator=g)
        return x

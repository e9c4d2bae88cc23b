"""The real digits and the image operations the diffusion experiment is built on (pure torch).

Images are float tensors `[B, 1, 16, 16]` in [0, 1] (ink = 1). scikit-learn's 8×8 digits are upsampled
bilinearly to 16×16: the UNet then has three resolutions (16, 8, 4), and a Gaussian blur of a pixel or two
is a visible, measurable change rather than a wipe-out of the whole glyph.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
NUM_CLASSES = 10
TEST_FRACTION = 0.2
SPLIT_SEED = 0

Split = Literal["train", "test", "all"]


def upsample(images8: torch.Tensor) -> torch.Tensor:
    """8×8 → 16×16, bilinear (smooth strokes; nearest would add blocky edges the blur metric would read as detail)."""
    return F.interpolate(images8, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False).clamp(
        0, 1
    )


def load_real_digits(split: Split = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 digits as `(images [N,1,16,16] in [0,1], labels [N])`.

    The split is fixed (stratified, 20 % test, seed 0) and shared by the diffusion model and the classifier: both are
    trained on "train" only, so "test" is unseen by either and serves as held-out real data.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    if split == "all":
        return upsample(x), y
    idx_train, idx_test = train_test_split(
        list(range(len(y))), test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=data.target
    )
    idx = torch.tensor(idx_train if split == "train" else idx_test)
    return upsample(x[idx]), y[idx]


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian, radius ceil(3 sigma)."""
    radius = max(1, math.ceil(3.0 * sigma))
    xs = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (xs / sigma) ** 2)
    return k / k.sum()


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding (per channel); `sigma <= 0` returns the input unchanged.

    Makes the "target" set of the blur concept (blurred real digits) and is the reference the blur metric is
    checked against. Reflect padding keeps the background from bleeding in at the border.
    """
    if sigma <= 0:
        return images
    k = gaussian_kernel1d(sigma).to(images)
    r = k.numel() // 2
    b, c, h, w = images.shape
    x = images.reshape(b * c, 1, h, w)
    # reflect padding needs pad < size; replicate the rest (only for very wide kernels on tiny images)
    mode = "reflect" if r < min(h, w) else "replicate"
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode=mode), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode=mode), k.view(1, 1, -1, 1))
    return x.reshape(b, c, h, w)


_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def laplacian(images: torch.Tensor) -> torch.Tensor:
    """5-point Laplacian over the interior (valid convolution: no padding artefacts), `[B, C, H-2, W-2]`."""
    b, c, h, w = images.shape
    x = images.reshape(b * c, 1, h, w)
    out = F.conv2d(x, _LAPLACIAN.to(images).view(1, 1, 3, 3))
    return out.reshape(b, c, h - 2, w - 2)

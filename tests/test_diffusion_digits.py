"""The embedded digits diffusion model: shipped weights, reproducible sampling, and the metrics it is measured with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from dsas.diffusion import (
    NULL_CLASS,
    DigitsDiffusion,
    blur,
    blur_score,
    concept_score,
    feature_similarity,
    image_similarity,
    load_digits_model,
    load_real_digits,
    predict_class,
)
from dsas.diffusion.digits import UNET_DIR

STEPS = 20
PER_CLASS = 8


@pytest.fixture(scope="module")
def model() -> DigitsDiffusion:
    torch.set_num_threads(2)
    return load_digits_model()


@pytest.fixture(scope="module")
def samples(model: DigitsDiffusion) -> tuple[torch.Tensor, list[int]]:
    """PER_CLASS images of every digit, made once and shared (sampling is the slow part)."""
    classes = [c for c in range(10) for _ in range(PER_CLASS)]
    return model.sample(classes, seed=0, steps=STEPS), classes


def test_shipped_weights_load_as_safetensors(model: DigitsDiffusion) -> None:
    files = {p.name for p in UNET_DIR.iterdir()}
    assert "diffusion_pytorch_model.safetensors" in files and "config.json" in files
    assert not any(f.endswith((".bin", ".pt", ".pkl", ".pth")) for f in files)
    n_params = sum(p.numel() for p in model.unet.parameters())
    assert 100_000 < n_params < 1_000_000
    assert model.unet.config["num_class_embeds"] == NULL_CLASS + 1
    assert not model.unet.training and not any(p.requires_grad for p in model.unet.parameters())
    assert model.classifier is not None


def test_sample_shape_range_and_determinism(model: DigitsDiffusion) -> None:
    a = model.sample([3, 7], seed=1, steps=8)
    b = model.sample([3, 7], seed=1, steps=8)
    c = model.sample([3, 7], seed=2, steps=8)
    assert a.shape == (2, 1, 16, 16) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 0.1


@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_rows_do_not_depend_on_batch_composition(model: DigitsDiffusion, guidance: float) -> None:
    batch = model.sample([4, 0, 9, 2], seed=3, steps=8, guidance=guidance)
    first_alone = model.sample([4], seed=3, steps=8, guidance=guidance)
    third_alone = model.sample([9], seed=3, steps=8, guidance=guidance, rows=[2])
    torch.testing.assert_close(first_alone[0], batch[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(third_alone[0], batch[2], atol=1e-6, rtol=0)
    # same noise, other class in another row: the row's image is unchanged
    swapped = model.sample([4, 5, 9, 5], seed=3, steps=8, guidance=guidance)
    torch.testing.assert_close(swapped[[0, 2]], batch[[0, 2]], atol=1e-6, rtol=0)


def test_float32_mode_matches_float64_up_to_rounding(model: DigitsDiffusion) -> None:
    assert model.dtype == torch.float64  # the default, for exact batch invariance
    fast = load_digits_model(with_classifier=False, dtype=torch.float32)
    assert fast.dtype == torch.float32
    a, b = model.sample([6, 1], seed=2, steps=8), fast.sample([6, 1], seed=2, steps=8)
    assert b.dtype == torch.float32 and (a - b).abs().max() < 1e-2


def test_classifier_recognises_generated_digits(samples: tuple[torch.Tensor, list[int]]) -> None:
    images, classes = samples
    pred = predict_class(images)
    truth = torch.tensor(classes)
    per_class = [float((pred[truth == c] == c).float().mean()) for c in range(10)]
    print("\nclassifier accuracy on generated samples, per class:", [round(a, 2) for a in per_class])
    assert float((pred == truth).float().mean()) >= 0.85  # chance is 0.1
    assert min(per_class) >= 0.5
    assert concept_score(images, classes).mean() > 0.8


def test_guidance_sharpens_class_identity(model: DigitsDiffusion) -> None:
    classes = [c for c in range(10) for _ in range(2)]
    plain = concept_score(model.sample(classes, seed=5, steps=10), classes).mean()
    guided = concept_score(model.sample(classes, seed=5, steps=10, guidance=1.0), classes).mean()
    assert guided >= plain - 0.01


def test_hooks_see_every_denoising_step(model: DigitsDiffusion) -> None:
    calls: list[tuple[int, ...]] = []
    assert model.unet.mid_block is not None
    handle = model.unet.mid_block.register_forward_hook(lambda m, i, o: calls.append(tuple(o.shape)))
    try:
        model.sample([1, 2, 3], steps=5)
        model.sample([1, 2, 3], steps=4, guidance=1.0)
    finally:
        handle.remove()
    assert calls == [(3, 48, 4, 4)] * 5 + [(6, 48, 4, 4)] * 4  # CFG: one [uncond; cond] batch per step


def test_classifier_on_held_out_real_digits() -> None:
    x, y = load_real_digits("test")
    assert x.shape == (360, 1, 16, 16)
    acc = float((predict_class(x) == y).float().mean())
    assert acc > 0.95
    meta = json.loads((Path(UNET_DIR).parent / "digits_classifier" / "config.json").read_text())
    assert meta["training"]["test_accuracy"] == pytest.approx(acc, abs=1e-3)


def test_blur_score_increases_monotonically_with_sigma() -> None:
    x, _ = load_real_digits("test")
    x = x[:50]
    sigmas = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0]
    scores = torch.stack([blur_score(blur(x, s)) for s in sigmas])  # [sigmas, images]
    assert bool((scores[1:] > scores[:-1]).all())
    assert bool(((scores > 0) & (scores <= 1)).all())
    assert blur_score(torch.full((1, 1, 16, 16), 0.5)).item() == 1.0  # flat image: maximally blurry


def test_blur_keeps_mass_and_identity_at_zero() -> None:
    x, _ = load_real_digits("test")
    assert torch.equal(blur(x[:4], 0.0), x[:4])
    out = blur(x[:4], 1.0)
    assert out.shape == x[:4].shape and out.min() >= 0
    torch.testing.assert_close(out.sum(dim=(1, 2, 3)), x[:4].sum(dim=(1, 2, 3)), rtol=0.05, atol=0)


def test_image_similarity(samples: tuple[torch.Tensor, list[int]]) -> None:
    images, _ = samples
    assert torch.allclose(image_similarity(images, images), torch.ones(len(images)), atol=1e-6)
    assert torch.allclose(feature_similarity(images, images), torch.ones(len(images)), atol=1e-5)
    sims = [image_similarity(images, blur(images, s)).mean().item() for s in (0.5, 1.0, 2.0)]
    assert 1 > sims[0] > sims[1] > sims[2]
    other = images.roll(PER_CLASS, dims=0)  # each image against a different digit
    assert image_similarity(images, other).mean() < sims[0]
    with pytest.raises(ValueError):
        image_similarity(images[:2], images[:3])


def test_denoise_inputs_pairs_source_and_target_noise(model: DigitsDiffusion) -> None:
    x, y = load_real_digits("test")
    src, tgt = x[:6], blur(x[:6], 1.5)
    ts = [899, 499, 99]
    a = list(model.denoise_inputs(src, y[:6], ts, seed=4))
    b = list(model.denoise_inputs(tgt, y[:6], ts, seed=4))
    assert [n.timestep for n in a] == ts
    for na, nb in zip(a, b, strict=True):
        assert na.x_t.shape == (6, 1, 16, 16) and torch.equal(na.t, torch.full((6,), na.timestep))
        # same noise: x_t differs exactly by the scaled difference of the clean images (in [-1, 1] space)
        abar = model.scheduler.alphas_cumprod[na.timestep]
        expected = (abar.sqrt() * 2 * (src - tgt)).to(na.x_t.dtype)
        torch.testing.assert_close(na.x_t - nb.x_t, expected, atol=1e-5, rtol=0)
    assert model.sampling_timesteps()[::4] == [n.timestep for n in model.denoise_inputs(src, y[:6])]
    eps = model.run_noised(src, y[:6], ts)
    assert len(eps) == 3 and eps[0].shape == (6, 1, 16, 16)

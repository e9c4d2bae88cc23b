"""Train the embedded offline diffusion default and its digit classifier, reproducibly, on CPU.

    .venv/bin/python scripts/train_digits.py                 # classifier, then UNet, then evaluation
    .venv/bin/python scripts/train_digits.py --only classifier
    .venv/bin/python scripts/train_digits.py --only unet --steps 500 --out /tmp/digits   # a quick trial

Writes under `--out` (default: src/dsas/assets):
  digits_classifier/  model.safetensors + config.json (architecture, held-out accuracy)
  digits_unet/        config.json + diffusion_pytorch_model.safetensors (EMA weights) + training.json
  digits_scheduler/   scheduler_config.json (the DDPM training schedule; sampling derives DDIM from it)

Both models train on the fixed "train" split of scikit-learn's digits (1437 images) only; the 360 "test" images are
held out. Same seed and thread count => same weights (torch CPU kernels are deterministic at a fixed thread count).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F
from diffusers.models.unets.unet_2d import UNet2DModel

from dsas.diffusion.classifier import CLASSIFIER_DIR, DigitsClassifier
from dsas.diffusion.digits import (
    NULL_CLASS,
    SCHEDULER_DIR,
    UNET_DIR,
    ddpm_scheduler,
    unet_config,
)
from dsas.diffusion.images import NUM_CLASSES, load_real_digits
from dsas.diffusion.metrics import predict_class

ASSETS = CLASSIFIER_DIR.parent


def random_shift(x: torch.Tensor, gen: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Translate each image by up to `max_shift` pixels (zero fill): the classifier must not rely on exact centring."""
    p = max_shift
    padded = F.pad(x, (p, p, p, p))
    offs = torch.randint(0, 2 * p + 1, (x.shape[0], 2), generator=gen)
    h, w = x.shape[-2:]
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offs.tolist())])


def train_classifier(out: Path, seed: int, epochs: int = 40) -> float:
    """Tiny CNN, Adam, shift augmentation; returns held-out accuracy."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x_train, y_train = load_real_digits("train")
    x_test, y_test = load_real_digits("test")
    model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(y_train), generator=gen)
        for i in range(0, len(perm), 64):
            idx = perm[i : i + 64]
            x = random_shift(x_train[idx], gen)
            loss = F.cross_entropy(model(x), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    acc = float((predict_class(x_test, model) == y_test).float().mean())
    seconds = time.perf_counter() - t0
    meta = {
        "data": "sklearn load_digits, fixed stratified split (seed 0, 20% test), upsampled 8x8 -> 16x16 bilinear",
        "train_images": len(y_train),
        "test_images": len(y_test),
        "test_accuracy": round(acc, 4),
        "epochs": epochs,
        "seed": seed,
        "train_seconds": round(seconds, 1),
        "params": sum(p.numel() for p in model.parameters()),
    }
    model.save(out / CLASSIFIER_DIR.name, meta)
    print(f"classifier: held-out accuracy {acc:.4f} on {len(y_test)} images ({seconds:.0f} s)", flush=True)
    return acc


def train_unet(
    out: Path, seed: int, steps: int, batch_size: int = 128, lr: float = 2e-3
) -> dict[str, object]:
    """Epsilon-prediction DDPM loss, 10 % label dropout to the null class, AdamW + cosine LR, EMA weights shipped."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x_train, y_train = load_real_digits("train")
    x0_all = x_train * 2 - 1
    model = UNet2DModel(**unet_config())
    ema = copy.deepcopy(model).requires_grad_(False)
    scheduler = ddpm_scheduler()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = min(100, steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + torch.cos(torch.tensor((step - warmup) / max(1, steps - warmup) * torch.pi)).item())

    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    print(f"unet: {n_params:,} parameters, {steps} steps of batch {batch_size}", flush=True)
    t0 = time.perf_counter()
    running = 0.0
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(y_train), (batch_size,), generator=gen)
        x0 = x0_all[idx]
        labels = y_train[idx].clone()
        labels[torch.rand(batch_size, generator=gen) < 0.1] = NULL_CLASS
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config["num_train_timesteps"], (batch_size,), generator=gen)
        pred = model(scheduler.add_noise(x0, noise, cast(torch.IntTensor, t)), t, class_labels=labels).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        decay = min(0.999, (1 + step) / (10 + step))  # EMA warm-up, then a ~1000-step horizon
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - decay)
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            print(f"  step {step + 1:5d}  loss {running:.4f}  {time.perf_counter() - t0:6.0f} s", flush=True)
    seconds = time.perf_counter() - t0
    ema.save_pretrained(str(out / UNET_DIR.name), safe_serialization=True)
    scheduler.save_pretrained(str(out / SCHEDULER_DIR.name))
    return {
        "data": "sklearn load_digits train split (1437 images), 16x16, scaled to [-1, 1]",
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "label_dropout": 0.1,
        "null_class": NULL_CLASS,
        "ema_decay": 0.999,
        "params": n_params,
        "final_loss": round(running, 5),
        "train_seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
    }


def evaluate(out: Path, per_class: int, guidances: tuple[float, ...] = (0.0, 1.0, 2.0)) -> dict[str, object]:
    """Classifier accuracy on the model's own samples, per class, for each guidance weight (w=2 overshoots)."""
    from dsas.diffusion.digits import load_digits_model

    model = load_digits_model(out)
    classes = [c for c in range(NUM_CLASSES) for _ in range(per_class)]
    result: dict[str, object] = {"samples_per_class": per_class, "steps": 20, "seed": 0}
    for w in guidances:
        t0 = time.perf_counter()
        images = model.sample(classes, seed=0, steps=20, guidance=w)
        seconds = time.perf_counter() - t0
        assert isinstance(model.classifier, DigitsClassifier)
        pred = predict_class(images, model.classifier)
        truth = torch.tensor(classes)
        per = [round(float((pred[truth == c] == c).float().mean()), 3) for c in range(NUM_CLASSES)]
        acc = float((pred == truth).float().mean())
        result[f"guidance_{w:g}"] = {
            "accuracy": round(acc, 4),
            "per_class": per,
            "sample_seconds": round(seconds, 1),
        }
        print(
            f"generated (guidance {w:g}): accuracy {acc:.3f}, per class {per} ({seconds:.1f} s)", flush=True
        )
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--only",
        choices=["unet", "classifier", "eval"],
        help="train just one model, or only re-evaluate the saved UNet (default: train both, then evaluate)",
    )
    ap.add_argument("--classifier", action="store_true", help="same as --only classifier")
    ap.add_argument("--steps", type=int, default=1500, help="UNet optimisation steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--eval-per-class", type=int, default=30, help="generated samples per class for evaluation"
    )
    ap.add_argument("--out", type=Path, default=ASSETS)
    args = ap.parse_args(argv)
    only = "classifier" if args.classifier else args.only
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if only in (None, "classifier"):
        train_classifier(args.out, args.seed)
    info_path = args.out / UNET_DIR.name / "training.json"
    if only in (None, "unet"):
        info_path.parent.mkdir(parents=True, exist_ok=True)
        info_path.write_text(json.dumps(train_unet(args.out, args.seed, args.steps), indent=2) + "\n")
    if (
        only in (None, "unet", "eval")
        and (args.out / CLASSIFIER_DIR.name).exists()
        and args.eval_per_class > 0
    ):
        info = json.loads(info_path.read_text())
        info["generated_accuracy"] = evaluate(args.out, args.eval_per_class)
        info_path.write_text(json.dumps(info, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

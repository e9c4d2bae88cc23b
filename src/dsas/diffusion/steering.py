"""Steering diffusion denoisers with the same steerers: sites, recording, fitting, and CLIP-based scores.

The rule is the LM one, `z' = z + lam * g(z) * Δ(z)`, applied by `Steerer.apply` to any denoiser (a diffusers
UNet or a DiT-style transformer) at every denoising step (every call of the denoiser inside the block):

* UNet feature maps `[B, C, H, W]`: every spatial location is a token with a C-dim vector, so the DSAS gate is a
  map `g[b, h, w] = sigmoid(w . z[b, :, h, w] + b)` (paper spec 3.7);
* transformer denoisers `[B, N, C]`: every image token (patch) is a token.

Fitting (paper spec 8): activations at every site are pooled over space, for noised images at a set of timesteps
(the forward process `x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps`, so sets that cannot be sampled, such as blurred
images, can be recorded). The CAA map is mean(target) - mean(source) per site; the DSAS regulator is trained on
source (label 1) vs control (label 0) pooled activations and applied per spatial location, at every step.

With classifier-free guidance a pipeline runs one `[uncond; cond]` batch of 2B rows per step; `apply(...,
expand="tile")` makes B per-prompt strengths follow both halves.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

from dsas.record import capture, check_finite, pool_tokens
from dsas.sites import Site, resolve_sites
from dsas.torchutil import model_device, output_tensor

if TYPE_CHECKING:
    from dsas.diffusion.digits import DigitsDiffusion, NoisedBatch

__all__ = [
    "STEP_POOLS",
    "DenoiserCall",
    "ImageSets",
    "clip_image_similarity",
    "clip_score",
    "default_sites",
    "digits_calls",
    "gate_maps",
    "noised_calls",
    "record_images",
    "resolve_denoiser_sites",
]

STEP_POOLS = ("mean", "each")

# -- sites ------------------------------------------------------------------------------------------------

_UNET_BLOCKS = r"(down_blocks\.\d+|mid_block|up_blocks\.\d+)"
_BLOCK = re.compile(r"(down_blocks\.\d+|mid_block|up_blocks\.\d+|(single_)?transformer_blocks\.\d+)")
_UNET_RESNETS = r"(down_blocks\.\d+\.resnets\.\d+|mid_block\.resnets\.\d+|up_blocks\.\d+\.resnets\.\d+)"


def default_sites(model: nn.Module) -> str | list[str]:
    """The default sites of a diffusers denoiser: a regex over module names, or a list of `name:i` sites.

    * UNets (`UNet2DModel`, `UNet2DConditionModel`, ...): every ResNet block's output in the down, mid and up
      paths. A ResNet output is a plain `[B, C, H, W]` map that feeds both the next layer and, in the down path,
      the skip connection, so a shift there reaches the decoder through both routes (a down *block*'s output is a
      tuple whose skip states would stay unsteered).
    * DiT / PixArt / `Transformer2DModel`: every `transformer_blocks.i` output (`[B, N, C]` image tokens).
    * SD3 / FLUX, whose blocks return `(encoder_hidden_states, hidden_states)`: element 1, the image stream, of
      every `transformer_blocks.i` and `single_transformer_blocks.i` (ml-act's FLUX sites).
    """
    names = [n for n, _ in model.named_modules()]
    if any(re.fullmatch(_UNET_RESNETS, n) for n in names):
        return _UNET_RESNETS
    blocks = [n for n in names if re.fullmatch(r"(single_)?transformer_blocks\.\d+", n)]
    if blocks:
        cls = type(model).__name__
        if "Flux" in cls or "SD3" in cls:
            return [f"{n}:1" for n in blocks]
        return r"transformer_blocks\.\d+"
    if any(re.fullmatch(_UNET_BLOCKS, n) for n in names):
        return _UNET_BLOCKS
    raise ValueError(
        f"No default diffusion sites for {type(model).__name__}: pass sites= as a regex over module names "
        "(see model.named_modules()), e.g. r'down_blocks\\.\\d+\\.resnets\\.\\d+'."
    )


def resolve_denoiser_sites(model: nn.Module, sites: str | Sequence[str] = "auto") -> list[Site]:
    """Sites of a denoiser in `named_modules()` order (a UNet registers `mid_block` after `up_blocks`).

    sites: "auto" (:func:`default_sites`), "blocks" (UNet down / mid / up block outputs), "resnets" (UNet ResNet
    outputs), a regex over module names, or a list of module names (`name:i` picks element i of a tuple output).
    `Site.layer` numbers the sites in that order (0 = first).
    """
    spec: str | Sequence[str] = sites
    if sites == "auto":
        spec = default_sites(model)
    elif sites == "blocks":
        spec = _UNET_BLOCKS
    elif sites == "resnets":
        spec = _UNET_RESNETS
    out = []
    for i, s in enumerate(resolve_sites(model, spec)):
        name = s.module_name
        kind = "resnet" if ".resnets." in name else "block" if _BLOCK.fullmatch(name) else "module"
        out.append(Site(s.name, kind, i))
    return out


# -- denoiser inputs --------------------------------------------------------------------------------------


@dataclass
class DenoiserCall:
    """One denoiser evaluation, `model(sample, timestep=timestep, **kwargs)`, over a batch of rows (images).

    All calls given to :func:`record_images` for one set must hold the same images in the same row order (one call
    per timestep, or several calls per timestep over row chunks with `rows`)."""

    sample: torch.Tensor
    """Noised input `[B, C, H, W]` (latents or pixels, the denoiser's own space)."""
    timestep: torch.Tensor
    """`[B]` (or a 0-d tensor) timesteps."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Conditioning: `class_labels=`, `encoder_hidden_states=`, ..."""
    rows: slice | None = None
    """Which image rows of the set this call holds (None: all of them)."""

    def __call__(self, model: nn.Module) -> Any:
        dev = model_device(model)
        kw = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in self.kwargs.items()}
        return model(self.sample.to(dev), timestep=self.timestep.to(dev), **kw)


def noised_calls(
    scheduler: Any,
    x0: torch.Tensor,
    timesteps: Sequence[int],
    *,
    seed: int = 0,
    batch_size: int | None = None,
    **kwargs: Any,
) -> Iterator[DenoiserCall]:
    """Denoiser inputs for clean images / latents `x0` `[N, C, H, W]` at each of `timesteps`, via the forward
    process of a diffusers noise `scheduler` (`add_noise`). Row i's noise at timestep index k is drawn from a
    generator seeded with `(seed, k, i)`, so two sets built from paired images with one seed share their noise.

    kwargs: conditioning passed to the denoiser; tensors whose first dim is N are split with the rows.
    """
    n = x0.shape[0]
    bs = batch_size or n
    for k, t in enumerate(timesteps):
        noise = torch.stack(
            [
                torch.randn(
                    x0.shape[1:], generator=torch.Generator().manual_seed((seed * 1000 + k) * 2**20 + i)
                )
                for i in range(n)
            ]
        ).to(x0.dtype)
        t_vec = torch.full((n,), int(t), dtype=torch.long)
        x_t = scheduler.add_noise(x0, noise, t_vec)
        for lo in range(0, n, bs):
            sl = slice(lo, min(n, lo + bs))
            kw = {
                key: v[sl] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v
                for key, v in kwargs.items()
            }
            yield DenoiserCall(x_t[sl], t_vec[sl], kw, sl if bs < n else None)


def digits_calls(
    model: DigitsDiffusion,
    images: torch.Tensor,
    classes: Sequence[int] | torch.Tensor,
    timesteps: Sequence[int] | None = None,
    seed: int = 0,
) -> list[DenoiserCall]:
    """Inputs of the embedded digits UNet for images `[N, 1, 16, 16]` in [0, 1] with their class ids, one call per
    timestep (:meth:`DigitsDiffusion.denoise_inputs`: paired noise for paired images under one seed)."""
    return [_from_noised(b) for b in model.denoise_inputs(images, classes, timesteps, seed)]


def _from_noised(b: NoisedBatch) -> DenoiserCall:
    return DenoiserCall(b.x_t, b.t, {"class_labels": b.class_labels})


# -- recording --------------------------------------------------------------------------------------------


def _as_call(c: Any) -> DenoiserCall:
    if isinstance(c, DenoiserCall):
        return c
    if hasattr(c, "x_t") and hasattr(c, "class_labels"):
        return _from_noised(c)
    raise TypeError(f"expected DenoiserCall or NoisedBatch inputs, got {type(c).__name__}")


@torch.no_grad()
def record_images(
    model: nn.Module,
    calls: Iterable[DenoiserCall | NoisedBatch],
    sites: Sequence[Site],
    *,
    steps: str = "mean",
) -> dict[str, Any]:
    """Activations at `sites`, pooled over space (UNet maps) or over image tokens (transformers), fp32 on CPU.

    calls: the denoiser inputs of one image set (:func:`digits_calls`, :func:`noised_calls`), the same rows at
           every timestep. Steering hooks active on `model`, if any, are seen.
    steps: "mean" -> {site: Tensor[N, d]}, averaged over the timesteps (spec 3.7); "each" -> {site: list of N
           Tensor[T, d]}, one row per timestep, for a regulator that labels every (image, timestep) pair and
           cross-validates by image.
    """
    if steps not in STEP_POOLS:
        raise ValueError(f"steps={steps!r} is not one of {STEP_POOLS}.")
    was_training = model.training
    model.eval()
    per_row: dict[str, dict[int, list[torch.Tensor]]] = {s.name: {} for s in sites}
    n_rows = 0
    try:
        with capture(model, sites) as store:
            for c in map(_as_call, calls):
                store.clear()
                c(model)
                lo = 0 if c.rows is None else c.rows.start
                for s in sites:
                    if s.name not in store:
                        raise RuntimeError(f"site {s.name} did not run during the denoiser call.")
                    h = output_tensor(store[s.name])
                    pooled = pool_tokens(h, None, "mean").cpu()
                    for j in range(pooled.shape[0]):
                        per_row[s.name].setdefault(lo + j, []).append(pooled[j])
                n_rows = max(n_rows, lo + int(c.sample.shape[0]))
    finally:
        model.train(was_training)
    if n_rows == 0:
        raise ValueError("No denoiser inputs: pass at least one call.")
    out: dict[str, Any] = {}
    for s in sites:
        rows = per_row[s.name]
        if sorted(rows) != list(range(n_rows)) or len({len(v) for v in rows.values()}) != 1:
            raise ValueError("Every image row must be seen the same number of times (once per timestep).")
        stacked = [torch.stack(rows[i]) for i in range(n_rows)]  # [T, d] each
        out[s.name] = torch.stack([t.mean(0) for t in stacked]) if steps == "mean" else stacked
    check_finite({k: torch.stack(v) if isinstance(v, list) else v for k, v in out.items()}, "images")
    return out


# -- fitting: image sets for dsas.fit ---------------------------------------------------------------------

Acts = dict[str, Any]
"""Activations already recorded with :func:`record_images` (timestep means [N, d], or per-image lists of [T, d]),
accepted by :class:`ImageSets` instead of denoiser calls."""

Calls = Iterable[Any] | Acts
"""Denoiser calls (`DenoiserCall`, `NoisedBatch`) of one image set, or its recorded activations."""


@dataclass
class ImageSets:
    """Source / target / control image sets of a diffusion denoiser, for `dsas.fit(denoiser, ImageSets(...))`.

    Each set is the denoiser calls of its images (:func:`digits_calls`, :func:`noised_calls`: one call per
    timestep over the same rows), or activations already recorded with :func:`record_images(steps="each")`.
    Source shows the concept (e.g. one digit class), target the wanted effect on it (the same images blurred,
    same noise), control everything else (other classes; needed by gate="dsas"). Activations are pooled over
    space; a method's maps see the mean over timesteps, and DSAS's `features="tokens"` labels every (image,
    timestep) pair (`features="mean"`: one timestep-mean vector per image).
    """

    source: Calls
    target: Calls
    control: Calls | None = None
    name: str = "images"
    kind: str = "images"

    def __post_init__(self) -> None:
        # Calls may be a one-shot iterator, and every split may be recorded more than once.
        for k in ("source", "target", "control"):
            v = getattr(self, k)
            if v is not None and not isinstance(v, dict):
                setattr(self, k, list(v))

    def validate(self, need_control: bool) -> None:
        for k in ("source", "target"):
            if not getattr(self, k):
                raise ValueError(f"ImageSets.{k} is empty: pass the denoiser calls of at least one image.")
        if need_control and not self.control:
            raise ValueError(
                "This gate needs a control set (images without the concept): ImageSets(control=...)."
            )

    def sizes(self) -> dict[str, int]:
        """Images per set (the rows its calls cover)."""

        def n(v: Calls | None) -> int:
            if not v:
                return 0
            if isinstance(v, dict):
                return len(next(iter(v.values())))
            calls = [_as_call(c) for c in v]
            return max(c.rows.stop if c.rows is not None else int(c.sample.shape[0]) for c in calls)

        return {k: n(getattr(self, k)) for k in ("source", "target", "control")}

    def resolve_sites(
        self, model: nn.Module, sites: str | Sequence[str], layers: Sequence[int] | None
    ) -> list[Site]:
        if layers is not None:
            raise ValueError(
                "layers= selects decoder blocks of a language model; for a denoiser pass sites=."
            )
        return resolve_denoiser_sites(model, sites)

    def record(
        self, model: nn.Module, split: str, sites: list[Site], pool: str, cfg: Any, progress: bool
    ) -> dict[str, Any]:
        given = getattr(self, split)
        if isinstance(given, dict):
            missing = [s.name for s in sites if s.name not in given]
            if missing:
                raise ValueError(f"ImageSets.{split}: the recorded activations lack sites {missing[:3]}.")
            return {s.name: _pool_steps(given[s.name], pool) for s in sites}
        return record_images(model, given, sites, steps="each" if pool == "all" else "mean")


def _pool_steps(v: Any, pool: str) -> Any:
    """Recorded activations in the form `pool` asks: per-image [T, d] lists ("all") or timestep means."""
    if pool == "all":
        if not isinstance(v, list):
            raise ValueError("features='tokens' needs activations recorded with record_images(steps='each').")
        return v
    return torch.stack([t.mean(0) for t in v]) if isinstance(v, list) else v


def gate_maps(trace: Any, site: str | None = None, size: tuple[int, int] | None = None) -> list[torch.Tensor]:
    """Per-step scale maps (`strength * g`) from the `Trace` of a denoising loop run with `trace=True`: one tensor
    per denoiser call, `[B, H, W]` (UNet; every site resized to `size`, default the first site's resolution) or
    `[B, N]` (transformer tokens), averaged over the traced sites (or of one `site`)."""
    per_site: dict[str, list[torch.Tensor]] = {}
    for name, _off, a in trace.calls:
        if site is None or name == site:
            per_site.setdefault(name, []).append(a.float().cpu())
    if not per_site:
        raise ValueError("The trace holds no scales: apply the steerer with trace=True (and a steered site).")
    n_calls = min(len(v) for v in per_site.values())
    out = []
    for k in range(n_calls):
        maps = [v[k] for v in per_site.values()]
        if maps[0].dim() == 3:
            hw = size or tuple(maps[0].shape[1:])
            maps = [
                m if tuple(m.shape[1:]) == hw else F.interpolate(m[:, None], size=hw, mode="bilinear")[:, 0]
                for m in maps
            ]
        out.append(torch.stack(maps).mean(0))
    return out


# -- CLIP scores (for users with a CLIP checkpoint) ---------------------------------------------------------


def _load_clip(model: Any, processor: Any) -> tuple[Any, Any]:
    if isinstance(model, str | Path):
        from transformers import CLIPModel, CLIPProcessor

        path = str(model)
        return CLIPModel.from_pretrained(path).eval(), processor or CLIPProcessor.from_pretrained(path)
    if processor is None:
        raise ValueError("pass processor= (a CLIPProcessor) with a CLIPModel object, or a model path.")
    return model, processor


def _to_pixels(images: Any) -> Any:
    """`[B, C, H, W]` tensors in [0, 1] (1 or 3 channels) -> list of HWC uint8 arrays the processor accepts."""
    if isinstance(images, torch.Tensor):
        x = images.detach().float().clamp(0, 1).cpu()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return [(im.permute(1, 2, 0).numpy() * 255).round().astype("uint8") for im in x]
    return images


@torch.no_grad()
def _image_embeds(model: Any, processor: Any, images: Any) -> torch.Tensor:
    px = processor(images=_to_pixels(images), return_tensors="pt")["pixel_values"]
    dev = model_device(model)
    e = model.get_image_features(pixel_values=px.to(dev))
    e = e if isinstance(e, torch.Tensor) else e.pooler_output
    return F.normalize(e.float(), dim=-1).cpu()


@torch.no_grad()
def clip_score(
    images: Any, prompts: Sequence[str], model: Any, processor: Any = None, *, w: float = 100.0
) -> torch.Tensor:
    """CLIPScore per image: `w * max(cos(E_image, E_text), 0)` (w = 100 as in torchmetrics; Hessel et al. use
    2.5). images: `[B, C, H, W]` in [0, 1], PIL images or arrays; model: a transformers `CLIPModel` (with its
    `processor`) or a local path to one."""
    model, processor = _load_clip(model, processor)
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    img = _image_embeds(model, processor, images)
    tok = processor(text=list(prompts), return_tensors="pt", padding=True, truncation=True)
    dev = model_device(model)
    t = model.get_text_features(
        **{k: v.to(dev) for k, v in tok.items() if k in ("input_ids", "attention_mask")}
    )
    t = t if isinstance(t, torch.Tensor) else t.pooler_output
    txt = F.normalize(t.float(), dim=-1).cpu()
    return w * (img * txt).sum(-1).clamp_min(0)


@torch.no_grad()
def clip_image_similarity(a: Any, b: Any, model: Any, processor: Any = None) -> torch.Tensor:
    """IMGScore per pair: cosine of CLIP image embeddings of a steered image and its unsteered twin."""
    model, processor = _load_clip(model, processor)
    return (_image_embeds(model, processor, a) * _image_embeds(model, processor, b)).sum(-1)

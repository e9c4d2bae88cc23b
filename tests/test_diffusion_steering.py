"""Steering diffusion denoisers with the same steerers: the embedded digits UNet, a tiny text-to-image Stable
Diffusion pipeline and a tiny DiT pipeline (random init, built offline), and the CLIP-based scores."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("diffusers")

import dsas
from dsas import Steerer
from dsas.diffusion import DigitsDiffusion, load_digits_model, load_real_digits
from dsas.diffusion.steering import (
    DenoiserCall,
    ImageSets,
    clip_image_similarity,
    clip_score,
    default_sites,
    digits_calls,
    gate_maps,
    noised_calls,
    record_images,
    resolve_denoiser_sites,
)
from dsas.gates import SiteGate

CONCEPT, TARGET, STEPS = 3, 8, 4


def fit_images(
    model: Any, source: Any, target: Any, control: Any = None, gate: str = "dsas", **kw: Any
) -> Steerer:
    """dsas.fit on image sets; a DSAS regulator labels every (image, timestep) unless told otherwise."""
    if gate == "dsas":
        kw.setdefault("features", "tokens")
    return dsas.fit(model, ImageSets(source, target, control), gate=gate, progress=False, **kw)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    """These models are tiny: one intra-op thread is as fast as two on an idle machine and avoids the 10-100x
    slowdown of oversubscribed OpenMP threads on a busy one. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits() -> DigitsDiffusion:
    return load_digits_model(dtype=torch.float32)


@pytest.fixture(scope="module")
def sets(digits: DigitsDiffusion) -> dict[str, list[DenoiserCall]]:
    """Concept = digit 3; target = the same noised inputs labelled 8; control = 2 images of every other digit."""
    x, y = load_real_digits("train")
    ts = digits.sampling_timesteps(10)[::3]
    src_x = x[y == CONCEPT][:16]
    src = digits_calls(digits, src_x, [CONCEPT] * 16, ts)
    tgt = [DenoiserCall(c.sample, c.timestep, {"class_labels": torch.full((16,), TARGET)}) for c in src]
    idx = torch.cat([torch.nonzero(y == c)[:2, 0] for c in range(10) if c != CONCEPT])
    ctl = digits_calls(digits, x[idx], y[idx], ts, seed=1)
    return {"source": src, "target": tgt, "control": ctl, "images": [src_x]}


@pytest.fixture(scope="module")
def steerers(digits: DigitsDiffusion, sets: dict[str, Any]) -> dict[str, Steerer]:
    s, t, c = sets["source"], sets["target"], sets["control"]
    return {
        "caa": fit_images(digits.unet, s, t, None, gate="none"),
        "dsas": fit_images(digits.unet, s, t, c, gate="dsas"),
    }


CLASSES = [CONCEPT, CONCEPT, CONCEPT, 0, 1, 5]


@pytest.fixture(scope="module")
def base(digits: DigitsDiffusion) -> torch.Tensor:
    return digits.sample(CLASSES, seed=0, steps=STEPS)


# -- sites, recording, fingerprint ----------------------------------------------------------------------


def test_default_sites_of_a_unet_are_its_resnets_in_model_order(digits: DigitsDiffusion) -> None:
    sites = resolve_denoiser_sites(digits.unet)
    names = [s.name for s in sites]
    module_order = [n for n, _ in digits.unet.named_modules() if n in set(names)]
    assert names == module_order and len(names) == 11
    assert all(re.fullmatch(r"(down_blocks\.\d|up_blocks\.\d|mid_block)\.resnets\.\d", n) for n in names)
    assert [s.layer for s in sites] == list(range(11)) and {s.kind for s in sites} == {"resnet"}
    blocks = [s.name for s in resolve_denoiser_sites(digits.unet, "blocks")]
    assert blocks == [f"down_blocks.{i}" for i in range(3)] + [f"up_blocks.{i}" for i in range(3)] + [
        "mid_block"
    ]


def test_record_images_pools_space_and_timesteps(digits: DigitsDiffusion, sets: dict[str, Any]) -> None:
    sites = resolve_denoiser_sites(digits.unet, ["mid_block.resnets.1", "down_blocks.0.resnets.0"])
    calls = sets["source"]
    mean = record_images(digits.unet, calls, sites)
    each = record_images(digits.unet, calls, sites, steps="each")
    assert mean["mid_block.resnets.1"].shape == (16, 48) and mean["down_blocks.0.resnets.0"].shape == (16, 32)
    assert len(each["mid_block.resnets.1"]) == 16 and each["mid_block.resnets.1"][0].shape == (len(calls), 48)
    torch.testing.assert_close(
        torch.stack([e.mean(0) for e in each["mid_block.resnets.1"]]), mean["mid_block.resnets.1"]
    )
    # by hand: the module's output map averaged over (H, W), then over the timesteps
    seen: list[torch.Tensor] = []
    mod = digits.unet.get_submodule("mid_block.resnets.1")
    handle = mod.register_forward_hook(lambda m, i, o: seen.append(o.float().mean((2, 3))))
    try:
        with torch.no_grad():
            for c in calls:
                c(digits.unet)
    finally:
        handle.remove()
    torch.testing.assert_close(torch.stack(seen).mean(0), mean["mid_block.resnets.1"])
    # chunks of rows (noised_calls with batch_size) give the same per-image result
    x0 = sets["images"][0] * 2 - 1
    whole = record_images(
        digits.unet, noised_calls(digits.scheduler, x0, [500, 100], class_labels=torch.full((16,), 3)), sites
    )
    chunked = record_images(
        digits.unet,
        noised_calls(digits.scheduler, x0, [500, 100], batch_size=5, class_labels=torch.full((16,), 3)),
        sites,
    )
    torch.testing.assert_close(
        whole["mid_block.resnets.1"], chunked["mid_block.resnets.1"], atol=1e-5, rtol=1e-5
    )


def test_fingerprint_names_the_denoiser_and_refuses_another(
    digits: DigitsDiffusion, steerers: dict[str, Steerer], tiny_sd: Any
) -> None:
    fp = steerers["dsas"].fingerprint
    assert fp["architecture"] == "UNet2DModel" and fp["sites"] == steerers["dsas"].site_names
    assert fp["site_dims"]["mid_block.resnets.0"] == 48
    steerers["dsas"].check_model(digits.unet)
    with pytest.raises(ValueError, match="different model"):
        steerers["dsas"].check_model(tiny_sd.unet)
    with pytest.raises(ValueError, match="different model"), steerers["dsas"].apply(tiny_sd.unet, 1.0):
        pass


# -- the rule on the digits UNet ------------------------------------------------------------------------


def test_strength_zero_and_zero_gate_reproduce_unsteered_images_bit_for_bit(
    digits: DigitsDiffusion, steerers: dict[str, Steerer], base: torch.Tensor
) -> None:
    for st in steerers.values():
        with st.apply(digits.unet, strength=0.0):
            assert torch.equal(digits.sample(CLASSES, seed=0, steps=STEPS), base)
        with st.apply(digits.unet, strength=2.0):
            assert (digits.sample(CLASSES, seed=0, steps=STEPS) - base).abs().max() > 0.05
    d = steerers["dsas"]
    closed = {
        n: SiteGate("sigmoid", torch.zeros_like(g.w), -1e4, 1.0)
        for n, g in d.gates.items()
        if g.w is not None
    }
    shut = Steerer(d.sites, d.maps, {**d.gates, **closed}, d.steered, d.config, d.fingerprint, d.stats)
    with shut.apply(digits.unet, strength=8.0):
        assert torch.equal(digits.sample(CLASSES, seed=0, steps=STEPS), base)


def test_scales_are_per_location_at_every_step(digits: DigitsDiffusion, steerers: dict[str, Steerer]) -> None:
    d = steerers["dsas"]
    with d.apply(digits.unet, strength=2.0, trace=True) as tr:
        digits.sample(CLASSES, seed=0, steps=STEPS)
    per_site: dict[str, list[torch.Tensor]] = {}
    for name, _off, a in tr.calls:
        per_site.setdefault(name, []).append(a)
    assert set(per_site) == set(d.steered) and len(d.steered) >= 3
    side = {"down_blocks.0": 16, "down_blocks.1": 8, "down_blocks.2": 4, "mid_block": 4, "up_blocks.0": 4,
            "up_blocks.1": 8, "up_blocks.2": 16}  # fmt: skip
    for name, maps in per_site.items():
        hw = side[name.rsplit(".resnets", 1)[0]]
        assert len(maps) == STEPS and all(m.shape == (len(CLASSES), hw, hw) for m in maps)
        assert all(bool(((m >= 0) & (m <= 2.0)).all()) for m in maps)
    deep = torch.stack(per_site["mid_block.resnets.0"])  # [steps, B, 4, 4]
    assert deep.flatten(2).std(-1).mean() > 1e-3  # varies over locations, not one scale per image
    conc = torch.tensor(CLASSES) == CONCEPT
    assert deep[:, conc].mean() > deep[:, ~conc].mean() + 0.5  # strength 2: gate ~0.8 vs ~0.1
    maps = gate_maps(tr, size=(16, 16))
    assert len(maps) == STEPS and maps[0].shape == (len(CLASSES), 16, 16)
    with steerers["caa"].apply(digits.unet, strength=1.5, trace=True) as tr2:
        digits.sample(CLASSES[:2], seed=0, steps=2)
    assert all(bool((a == 1.5).all()) for _n, _o, a in tr2.calls)


def test_dsas_gate_selects_the_concept_class(digits: DigitsDiffusion, steerers: dict[str, Steerer]) -> None:
    d = steerers["dsas"]
    assert d.config["options"]["dsas"]["features"] == "tokens"  # every (image, timestep) labelled
    assert d.config["n_prompts"] == {"source": 16, "target": 16, "control": 18}
    acc = {r["site"]: r["accuracy"] for r in d.report()}
    assert min(acc[s] for s in ("mid_block.resnets.0", "mid_block.resnets.1", "up_blocks.0.resnets.0")) > 0.95
    classes = [CONCEPT] * 4 + [c for c in range(10) if c != CONCEPT]
    with d.apply(digits.unet, strength=1.0, trace=True) as tr:
        digits.sample(classes, seed=3, steps=STEPS)
    g = torch.stack(gate_maps(tr, size=(16, 16))).mean(0).flatten(1).mean(1)
    conc = torch.tensor(classes) == CONCEPT
    print(f"\nmean gate: concept {g[conc].mean():.3f}, other digits {g[~conc].mean():.3f}")
    assert g[conc].min() > g[~conc].max()
    assert g[conc].mean() > g[~conc].mean() + 0.3


def test_per_row_strengths_follow_a_cfg_batch(digits: DigitsDiffusion, steerers: dict[str, Steerer]) -> None:
    st = steerers["caa"]
    cls = [CONCEPT, CONCEPT]
    plain = digits.sample(cls, seed=1, steps=3, guidance=2.0)
    with st.apply(digits.unet, strength=2.0, expand="tile"):
        both = digits.sample(cls, seed=1, steps=3, guidance=2.0)
    with st.apply(digits.unet, strength=[0.0, 2.0], expand="tile", trace=True) as tr:
        mixed = digits.sample(cls, seed=1, steps=3, guidance=2.0)
    # the UNet batch is [uncond row 0, uncond row 1, cond row 0, cond row 1]: tile gives strengths [0, 2, 0, 2]
    a = tr.calls[0][2]
    assert a.shape[0] == 4 and a[[0, 2]].eq(0).all() and a[[1, 3]].eq(2).all()
    assert torch.equal(mixed[0], plain[0])
    assert torch.equal(mixed[1], both[1]) and (mixed[1] - plain[1]).abs().max() > 0.05
    with (
        pytest.raises(ValueError, match="strength has 3 values"),
        st.apply(digits.unet, strength=[1.0, 2.0, 3.0]),
    ):
        digits.sample(cls, seed=1, steps=1, guidance=2.0)


def test_save_load_gives_identical_images(
    digits: DigitsDiffusion, steerers: dict[str, Steerer], tmp_path: Path
) -> None:
    d = steerers["dsas"]
    d.save(tmp_path / "st")
    cfg = json.loads((tmp_path / "st" / "dsas_config.json").read_text())
    assert cfg["config"]["domain"] == "images" and cfg["fingerprint"]["architecture"] == "UNet2DModel"
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in (tmp_path / "st").iterdir())
    loaded = Steerer.load(tmp_path / "st", model=digits.unet)
    assert loaded.steered == d.steered
    with d.apply(digits.unet, strength=3.0):
        a = digits.sample(CLASSES, seed=2, steps=STEPS)
    with loaded.apply(digits.unet, strength=3.0):
        b = digits.sample(CLASSES, seed=2, steps=STEPS)
    assert torch.equal(a, b)


def test_fit_diffusion_accepts_recorded_activations_and_checks_options(
    digits: DigitsDiffusion, sets: dict[str, Any], steerers: dict[str, Steerer]
) -> None:
    sites = resolve_denoiser_sites(digits.unet)
    src = record_images(digits.unet, sets["source"], sites)
    tgt = record_images(digits.unet, sets["target"], sites)
    st = fit_images(digits.unet, src, tgt, gate="none")
    for n in st.site_names:
        torch.testing.assert_close(st.maps[n].shift, steerers["caa"].maps[n].shift)
    with pytest.raises(ValueError, match="control"):
        fit_images(digits.unet, src, tgt, None, gate="dsas")
    with pytest.raises(TypeError, match="Unknown option"):
        fit_images(digits.unet, src, tgt, src, gate="dsas", pca=3)
    with pytest.raises(ValueError, match="gate="):
        fit_images(digits.unet, src, tgt, src, gate="e2e-relu")


# -- real diffusers pipelines (random init, built offline) ------------------------------------------------


def _tiny_clip_tokenizer(tmp: Path) -> Any:
    """A CLIP BPE tokenizer from a hand-made vocabulary (letters + a few whole words), no hub needed."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    letters = "abcdefghijklmnopqrstuvwxyz"
    for c in letters:
        vocab[c] = len(vocab)
    for c in letters:
        vocab[c + "</w>"] = len(vocab)
    merges = ["#version: 0.2"]
    for word in ("photo", "of", "cat", "dog", "blurry", "banana", "red", "car"):
        toks = [*word[:-1], word[-1] + "</w>"]
        while len(toks) > 1:
            merges.append(f"{toks[0]} {toks[1]}")
            toks = [toks[0] + toks[1], *toks[2:]]
            vocab.setdefault(toks[0], len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    (tmp / "merges.txt").write_text("\n".join(merges) + "\n")
    return CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), model_max_length=16)


def _tiny_text_config(tok: Any) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, projection_dim=16, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip


def _tiny_vae() -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8,), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4, sample_size=8,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """StableDiffusionPipeline from random-init tiny parts: CLIP text encoder + tokenizer, UNet2DConditionModel
    (cross-attention), AutoencoderKL, DDIM."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    tok = _tiny_clip_tokenizer(tmp_path_factory.mktemp("clip_tok"))
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=4, attention_head_dim=4,
    )  # fmt: skip
    sched = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )  # fmt: skip
    pipe = StableDiffusionPipeline(
        vae=_tiny_vae(), text_encoder=CLIPTextModel(_tiny_text_config(tok)).eval(), tokenizer=tok,
        unet=unet.eval(), scheduler=sched, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _embed(pipe: Any, prompts: list[str]) -> torch.Tensor:
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=16, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def _sd_images(pipe: Any, prompts: list[str], seeds: list[int], steps: int = 3) -> torch.Tensor:
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    out = pipe(prompts, num_inference_steps=steps, guidance_scale=3.0, height=8, width=8, generator=gens,
               output_type="pt")  # fmt: skip
    return out.images


def test_text_to_image_pipeline_is_steered_per_location_with_cfg(tiny_sd: Any, tmp_path: Path) -> None:
    pipe = tiny_sd
    assert "resnets" in default_sites(pipe.unet)
    names = [s.name for s in resolve_denoiser_sites(pipe.unet)]
    assert len(names) == 8 and all(".resnets." in n for n in names)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 4, 8, 8, generator=g)
    ts = [900, 500, 100]
    src = noised_calls(pipe.scheduler, x0, ts, encoder_hidden_states=_embed(pipe, ["a photo of a cat"] * 8))
    tgt = noised_calls(
        pipe.scheduler, x0, ts, encoder_hidden_states=_embed(pipe, ["a blurry photo of a cat"] * 8)
    )
    ctl = noised_calls(pipe.scheduler, torch.randn(8, 4, 8, 8, generator=g), ts, seed=1,
                       encoder_hidden_states=_embed(pipe, ["a photo of a dog"] * 4 + ["a red car"] * 4))  # fmt: skip
    # Only the cross-attention ResNets see the text: steer every site (inactive="keep") so that they are in.
    st = fit_images(pipe.unet, src, tgt, ctl, gate="dsas", acc_threshold=0.5, inactive="keep")
    assert st.steered and st.fingerprint["architecture"] == "UNet2DConditionModel"
    assert any(not st.maps[n].is_zero() for n in st.steered)
    prompts, seeds = ["a photo of a cat", "a photo of a dog"], [0, 1]
    plain = _sd_images(pipe, prompts, seeds)
    with st.apply(pipe.unet, strength=0.0, expand="tile"):
        assert torch.equal(_sd_images(pipe, prompts, seeds), plain)
    with st.apply(pipe.unet, strength=[0.0, 50.0], expand="tile", trace=True) as tr:
        mixed = _sd_images(pipe, prompts, seeds)
    assert torch.equal(mixed[0], plain[0]) and not torch.equal(mixed[1], plain[1])
    calls = [a for n, _o, a in tr.calls if n == st.steered[0]]
    assert len(calls) == 3  # one per denoising step, each on the CFG batch [uncond x2; cond x2]
    assert calls[0].dim() == 3 and calls[0].shape[0] == 4
    assert calls[0][[0, 2]].eq(0).all() and (calls[0][[1, 3]] > 0).all()
    st.save(tmp_path / "sd")
    loaded = Steerer.load(tmp_path / "sd", model=pipe.unet)
    with loaded.apply(pipe.unet, strength=[0.0, 50.0], expand="tile"):
        assert torch.equal(_sd_images(pipe, prompts, seeds), mixed)


@pytest.fixture(scope="module")
def tiny_dit() -> Any:
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=2, sample_size=8,
        patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=4,
    )  # fmt: skip
    pipe = DiTPipeline(transformer=dit.eval(), vae=_tiny_vae(), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_transformer_denoiser_is_steered_per_image_token(tiny_dit: Any) -> None:
    pipe = tiny_dit
    dit = pipe.transformer
    assert [s.name for s in resolve_denoiser_sites(dit)] == ["transformer_blocks.0", "transformer_blocks.1"]
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 4, 8, 8, generator=g)
    ts = [800, 400, 50]
    src = list(noised_calls(pipe.scheduler, x0, ts, class_labels=torch.full((8,), 1)))
    tgt = list(noised_calls(pipe.scheduler, x0, ts, class_labels=torch.full((8,), 2)))
    ctl = list(noised_calls(pipe.scheduler, torch.randn(8, 4, 8, 8, generator=g), ts, seed=1,
                            class_labels=torch.arange(3, 11)))  # fmt: skip
    acts = record_images(dit, src, resolve_denoiser_sites(dit))
    assert acts["transformer_blocks.0"].shape == (8, 16)  # pooled over the 16 image tokens (4x4 patches)
    st = fit_images(dit, src, tgt, ctl, gate="dsas", acc_threshold=0.5)
    assert st.fingerprint["architecture"] == "DiTTransformer2DModel" and st.steered

    def run() -> torch.Tensor:
        gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
        return pipe(class_labels=[1, 5], num_inference_steps=3, guidance_scale=4.0, generator=gens,
                    output_type="np").images  # fmt: skip

    plain = torch.as_tensor(run())
    with st.apply(dit, strength=0.0, expand="tile"):
        assert torch.equal(torch.as_tensor(run()), plain)
    with st.apply(dit, strength=[0.0, 20.0], expand="tile", trace=True) as tr:
        mixed = torch.as_tensor(run())
    assert torch.equal(mixed[0], plain[0]) and not torch.equal(mixed[1], plain[1])
    calls = [a for n, _o, a in tr.calls if n == st.steered[0]]
    assert len(calls) == 3 and calls[0].shape == (4, 16)  # [cond x2; null x2] rows, 16 image tokens
    assert calls[0][[0, 2]].eq(0).all() and (calls[0][[1, 3]] > 0).all()
    assert calls[0][1].std() > 0  # a scale per token
    with st.apply(dit, strength=[0.0, 20.0], expand="tile"):
        fast = torch.as_tensor(run())  # untraced: the eager folded path (lam folded into the shift)
    assert torch.equal(fast[0], plain[0])
    torch.testing.assert_close(fast, mixed, atol=1e-4, rtol=0)  # same rule, rounded in another order


def test_flux_style_blocks_steer_their_image_stream() -> None:
    """FLUX / SD3 blocks return (text stream, image stream): the default sites pick element 1."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    flux = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(4, 2, 2),
    ).eval()  # fmt: skip
    sites = resolve_denoiser_sites(flux)
    assert [s.name for s in sites] == ["transformer_blocks.0:1", "single_transformer_blocks.0:1"]
    g = torch.Generator().manual_seed(0)
    cond = dict(
        encoder_hidden_states=torch.randn(6, 5, 16, generator=g), pooled_projections=torch.randn(6, 16, generator=g),
        img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(5, 3),
    )  # fmt: skip
    x = torch.randn(6, 16, 4, generator=g)  # packed latents: 16 image tokens
    t = torch.full((6,), 0.5)
    st = fit_images(
        flux, [DenoiserCall(x, t, cond)], [DenoiserCall(x + 1, t, cond)], [DenoiserCall(-x, t, cond)],
        gate="dsas", acc_threshold=0.5,
    )  # fmt: skip
    with torch.no_grad():
        plain = flux(x, timestep=t, **cond).sample
        with st.apply(flux, 0.0):
            assert torch.equal(flux(x, timestep=t, **cond).sample, plain)
        with st.apply(flux, 3.0, trace=True) as tr:
            steered = flux(x, timestep=t, **cond).sample
    assert (steered - plain).abs().max() > 1e-3
    assert {n for n, _o, _a in tr.calls} == set(st.steered) and all(
        a.shape == (6, 16) for _n, _o, a in tr.calls
    )


# -- CLIPScore ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    d = tmp_path_factory.mktemp("tiny_clip")
    tok = _tiny_clip_tokenizer(d)
    torch.manual_seed(0)
    vision = dict(image_size=16, patch_size=4, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4, projection_dim=16)  # fmt: skip
    cfg = CLIPConfig(text_config=_tiny_text_config(tok).to_dict(), vision_config=vision, projection_dim=16)
    CLIPModel(cfg).save_pretrained(d)
    proc = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
        tokenizer=tok,
    )
    proc.save_pretrained(d)
    return d


def test_clip_score_with_a_local_clip_model(tiny_clip_dir: Path, digits: DigitsDiffusion) -> None:
    from transformers import CLIPModel, CLIPProcessor

    images = digits.sample([3, 7, 1], seed=0, steps=3)
    prompts = ["a photo of a cat", "a red car", "a photo of a dog"]
    s = clip_score(images, prompts, tiny_clip_dir)
    assert s.shape == (3,) and bool(((s >= 0) & (s <= 100)).all())
    model, proc = (
        CLIPModel.from_pretrained(tiny_clip_dir).eval(),
        CLIPProcessor.from_pretrained(tiny_clip_dir),
    )
    torch.testing.assert_close(clip_score(images, prompts, model, proc), s)
    # by hand: 100 * max(cos(image, text), 0) with the model's own projections
    px = proc(images=[(im.expand(3, -1, -1).permute(1, 2, 0).numpy() * 255).round().astype("uint8") for im in images],
              return_tensors="pt")["pixel_values"]  # fmt: skip
    ids = proc(text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], pixel_values=px)
    cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
    torch.testing.assert_close(s, 100 * cos.clamp_min(0), atol=1e-4, rtol=1e-4)
    sim = clip_image_similarity(images, images, tiny_clip_dir)
    torch.testing.assert_close(sim, torch.ones(3), atol=1e-5, rtol=0)
    other = clip_image_similarity(images, images.flip(0), tiny_clip_dir)
    assert other[0] < 1 - 1e-4


def test_strength_zero_is_bit_identical_on_a_float64_unet() -> None:
    model = load_digits_model(with_classifier=False)  # float64 by default
    assert next(model.unet.parameters()).dtype == torch.float64
    x, y = load_real_digits("train")
    src = digits_calls(model, x[y == 3][:8], [3] * 8, [500])
    tgt = [DenoiserCall(c.sample, c.timestep, {"class_labels": torch.full((8,), 8)}) for c in src]
    st = fit_images(model.unet, src, tgt, gate="none", sites="mid_block")
    plain = model.sample([3, 5], seed=0, steps=2)
    with st.apply(model.unet, strength=0.0):
        assert torch.equal(model.sample([3, 5], seed=0, steps=2), plain)


@pytest.mark.parametrize("method", ["caa", "iti", "linear_act"])
@pytest.mark.parametrize("gate", ["none", "dsas"])
def test_every_map_method_steers_the_digits_model(
    digits: DigitsDiffusion, sets: dict[str, Any], method: str, gate: str, tmp_path: Path
) -> None:
    """One fit pipeline: the model-agnostic maps fit on denoiser activations, with and without DSAS."""
    kw = {"control": sets["control"], "acc_threshold": 0.5} if gate == "dsas" else {}
    st = fit_images(digits.unet, sets["source"], sets["target"], gate=gate, method=method, **kw)
    assert st.method == method and st.config["domain"] == "images" and st.steered
    plain = digits.sample(CLASSES, seed=3, steps=STEPS)
    with st.apply(digits.unet, strength=0.0):
        assert torch.equal(digits.sample(CLASSES, seed=3, steps=STEPS), plain)
    with st.apply(digits.unet, strength=4.0):
        steered = digits.sample(CLASSES, seed=3, steps=STEPS)
    assert not torch.allclose(steered, plain, atol=1e-3)
    st.save(tmp_path / "st")
    back = Steerer.load(tmp_path / "st", model=digits.unet)
    with back.apply(digits.unet, strength=4.0):
        assert torch.equal(digits.sample(CLASSES, seed=3, steps=STEPS), steered)


@pytest.mark.parametrize(
    ("method", "gate"), [("lineas", "none"), ("lineas", "e2e-sigmoid"), ("caa", "threshold")]
)
def test_text_only_components_say_so_on_images(
    digits: DigitsDiffusion, sets: dict[str, Any], method: str, gate: str
) -> None:
    with pytest.raises(ValueError, match="needs a text model"):
        fit_images(digits.unet, sets["source"], sets["target"], sets["control"], gate=gate, method=method)


def test_skip_tokens_is_refused_on_images(digits: DigitsDiffusion, sets: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="skip_tokens=1 leaves the first tokens"):
        fit_images(digits.unet, sets["source"], sets["target"], sets["control"], gate="none", skip_tokens=1)

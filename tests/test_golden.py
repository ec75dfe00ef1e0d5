"""One test per golden case: the official code's numbers, reproduced (FORMAT.md, relative L2 <= 1e-4).

The set is read from STABLESR_GOLDEN (default tests/golden); every size and setting comes from its files.
A case that the set does not contain is skipped with that reason; the public set (version 2) has them all.
"""

import re

import pytest
import torch

from stablesr_min.cfw import CFWAutoencoder
from stablesr_min.colorfix import METHODS, color_fix
from stablesr_min.degradation import (filter2d, gaussian_kernel, generalized_gaussian_kernel, plateau_kernel,
                                      sinc_kernel, usm_sharpen)
from stablesr_min.model import load_stablesr
from stablesr_min.objective import Denoiser, diffusion_loss
from stablesr_min.pipeline import Noises, StableSRPipeline, UpscaleOptions, make_denoiser
from stablesr_min.sampler import aggregation_step, ddim_step
from stablesr_min.schedule import DDIM_TABLES, TABLES, DDIMSchedule, Schedule
from stablesr_min.text import TextEncoder
from stablesr_min.time_encoder import TimeAwareEncoder
from stablesr_min.tokenizer import tokenize
from stablesr_min.train.sr import prepare_for_finetuning
from stablesr_min.unet import UNet
from stablesr_min.vae import AutoencoderKL
from stablesr_min.weights import load_module

from golden import relative_error

TOL = 1e-4


def needs_case(golden, case):
    if case not in golden.cases:
        pytest.skip(f"golden set {golden.path} has no {case!r} case")


def assert_close(ours, ref, what):
    err = relative_error(ours, ref)
    assert err <= TOL, f"{what}: relative L2 error {err:.3g} > {TOL}"


@torch.inference_mode()
def test_vae(golden, stablesr_files):
    needs_case(golden, "vae")
    vae = load_module(AutoencoderKL(golden.config.vae), stablesr_files, "first_stage_model.")
    assert_close(vae.moments(golden["vae.image"]), golden["vae.moments"], "moments")
    assert_close(vae.decode(golden["vae.latent"]), golden["vae.decoded"], "decoded")


@torch.inference_mode()
def test_cfw(golden, cfw_files):
    needs_case(golden, "cfw")
    cfw = load_module(CFWAutoencoder(golden.config.cfw), cfw_files, "")
    moments, features = cfw.encode_with_features(golden["cfw.image"])
    assert_close(moments, golden["cfw.moments"], "moments")
    stored = [n for n in golden.names("cfw") if n.startswith("enc_fea_")]
    assert len(features) == len(stored)
    for i, level in enumerate(sorted(features)):  # the reference lists the levels' features in order
        assert_close(features[level], golden[f"cfw.enc_fea_{i}"], f"enc_fea_{i}")
    for name in (n for n in golden.names("cfw") if n.startswith("decoded_w")):
        w = float(name.removeprefix("decoded_w").replace("p", "."))
        assert_close(cfw.decode(golden["cfw.latent"], features, w), golden[f"cfw.{name}"], name)


@torch.inference_mode()
def test_text(golden, stablesr_files):
    needs_case(golden, "text")
    cfg = golden.config.text
    tokens = tokenize(golden.params("text")["prompts"], cfg.context_length)
    assert torch.equal(tokens, golden["text.tokens"]), "tokens differ from open_clip.tokenize"
    encoder = load_module(TextEncoder(cfg), stablesr_files, "cond_stage_model.model.")
    assert_close(encoder(tokens), golden["text.context"], "context")


@torch.inference_mode()
def test_time_encoder(golden, stablesr_files):
    needs_case(golden, "time_encoder")
    encoder = load_module(TimeAwareEncoder(golden.config.time_encoder), stablesr_files, "structcond_stage_model.")
    features = encoder(golden["time_encoder.latent"], golden["time_encoder.t"])
    expected = golden.struct_cond()
    assert sorted(features) == sorted(expected)
    for width, ref in expected.items():
        assert_close(features[width], ref, f"feature_{width}")


@torch.inference_mode()
def test_unet(golden, stablesr_files):
    needs_case(golden, "unet")
    unet = load_module(UNet(golden.config.unet), stablesr_files, "model.diffusion_model.")
    output = unet(golden["unet.x"], golden["unet.t"], golden["unet.context"], golden.struct_cond())
    assert_close(output, golden["unet.output"], "output")


def test_schedule(golden):
    """Every stored table, by its reference buffer name: `schedule.<table>` for the training schedule;
    `schedule.schedule_<N>.<table>`, `schedule.schedule_<N>_<table>` or `schedule_<N>.<table>` for the
    schedule respaced to N steps. A name of any other form fails the test."""
    cases = [case for case in golden.cases if re.fullmatch(r"schedule(_\d+)?", case)]
    if not cases:
        needs_case(golden, "schedule")
    base = Schedule.from_config(golden.config.diffusion)
    keys = [f"{case}.{name}" for case in cases for name in golden.names(case)]
    assert keys, f"golden set {golden.path}: schedule cases {cases} store no tensors"
    for key in keys:
        match = re.fullmatch(r"schedule(?:\.schedule)?(?:_(\d+))?[._](\w+)", key)
        assert match and match[2] in TABLES, f"unknown schedule tensor {key!r}"
        steps, table = match.groups()
        ours, ref = getattr(base.respace(int(steps)) if steps else base, table), golden[key]
        if ref.dtype.is_floating_point:
            assert_close(ours, ref, key)
        else:
            assert torch.equal(ours, ref.to(ours.dtype)), f"{key}: {ours.tolist()} != {ref.tolist()}"


def test_colorfix(golden):
    """`content` corrected towards `style`, once per stored method (`adain`, `wavelet`, `none`)."""
    needs_case(golden, "colorfix")
    content, style = golden["colorfix.content"], golden["colorfix.style"]
    methods = [name for name in golden.names("colorfix") if name not in ("content", "style")]
    assert methods, f"golden set {golden.path}: the colorfix case stores no output"
    for method in methods:
        assert method in METHODS, f"unknown colorfix tensor {method!r}"
        assert_close(color_fix(content, style, method), golden[f"colorfix.{method}"], method)


@torch.inference_mode()
def test_canvas_step(golden, stablesr):
    needs_case(golden, "canvas_step")
    p = golden.params("canvas_step")
    cfg = golden.config.diffusion
    assert p.get("parameterization", cfg.parameterization) == cfg.parameterization
    schedule = Schedule.from_config(cfg).respace(p["steps"])
    assert schedule.timestep_map[p["step_index"]] == p["timestep"]
    denoise = make_denoiser(stablesr, golden["canvas_step.context"])
    x_prev = aggregation_step(schedule, golden["canvas_step.x"], golden["canvas_step.lr_latent"],
                              p["step_index"], denoise, golden["canvas_step.noise"], tile=p["tile"],
                              overlap=p["overlap"], weights=golden["canvas_step.tile_weights"])
    assert_close(x_prev, golden["canvas_step.x_prev"], "x_prev")


@torch.inference_mode()
def test_pipeline(golden, stablesr, cfw):
    needs_case(golden, "pipeline")
    p = golden.params("pipeline")
    model = stablesr
    assert p.get("parameterization", model.cfg.diffusion.parameterization) == model.cfg.diffusion.parameterization
    opts = UpscaleOptions(scale=p["upscale"], steps=p["steps"], tile=p["tile"], overlap=p["overlap"],
                          dec_w=p["dec_w"], colorfix=p["colorfix"], prompt=p["prompt"],
                          tile_weights="official", vae_tile=0)
    assert p["input_size"] == opts.tile * model.vae.downscale
    noises = Noises(vae=golden["pipeline.vae_noise"], x_T=golden["pipeline.xt_noise"],
                    steps=list(golden["pipeline.step_noises"].unbind(0)))
    latents = []
    output = StableSRPipeline(model, cfw)(golden["pipeline.lr"], opts, noises=noises,
                                          on_step=lambda i, n, x: latents.append(x))
    assert len(latents) == p["steps"]
    assert_close(latents[-1], golden["pipeline.latent_0"], "latent_0 (the sampled latent)")
    assert_close(output, golden["pipeline.output"], "output")


def test_train_step(golden, golden_weights):
    """The fine-tuning objective (Sec. 3.1) on the golden batch: the loss, exactly which parameters train,
    every gradient's norm and the stored full gradients."""
    needs_case(golden, "train_step")
    p = golden.params("train_step")
    model = load_stablesr([golden_weights[0]])  # a fresh copy: gradients flow into it
    assert p.get("parameterization", model.cfg.diffusion.parameterization) == model.cfg.diffusion.parameterization
    trainable = prepare_for_finetuning(model)
    assert list(trainable) == p["trainable"]
    assert sorted(n for n, q in model.named_parameters() if q.requires_grad) == p["trainable"]
    loss = diffusion_loss(Denoiser(model), Schedule.from_config(model.cfg.diffusion), golden["train_step.lr_latent"],
                          golden["train_step.hr_latent"], golden["train_step.t"], golden["train_step.noise"],
                          golden["train_step.context"])
    loss.backward()
    assert_close(loss.reshape(golden["train_step.loss"].shape), golden["train_step.loss"], "loss")
    norms = torch.stack([trainable[name].grad.norm() for name in p["trainable"]])
    assert_close(norms, golden["train_step.grad_norms"], "grad_norms")
    for key, name in p["full_grads"].items():
        assert_close(trainable[name].grad, golden[f"train_step.{key}"], f"{key} (d loss / d {name})")


# The version-2 cases of features still being built: each fails until its issue lands (strict xfail).


def kernel_from_spec(spec: list) -> torch.Tensor:
    """A kernel from its cases.json spec (FORMAT.md): ['gaussian', size, sx, sy, theta, isotropic],
    ['generalized' | 'plateau', size, sx, sy, theta, beta, isotropic], ['sinc', cutoff, size, pad_to]."""
    kind, *args = spec
    if kind == "sinc":
        cutoff, size, pad_to = args
        return sinc_kernel(cutoff, size, pad_to)
    size, sigma_x, sigma_y, theta, *beta, isotropic = args
    if isotropic:
        sigma_y, theta = sigma_x, 0.0
    make = {"gaussian": gaussian_kernel, "generalized": generalized_gaussian_kernel, "plateau": plateau_kernel}
    return make[kind](size, sigma_x, sigma_y, theta, *beta)


def test_degradation(golden):
    needs_case(golden, "degradation")
    p = golden.params("degradation")
    kernels = {name: kernel_from_spec(spec) for name, spec in p["kernels"].items()}
    stored = [n.removeprefix("kernel_") for n in golden.names("degradation") if n.startswith("kernel_")]
    assert sorted(kernels) == sorted(stored)
    for name, kernel in kernels.items():
        assert_close(kernel, golden[f"degradation.kernel_{name}"], f"kernel_{name}")
    image = golden["degradation.image"]
    per_image = torch.stack([kernels[name] for name in p["filter_pair"]])
    assert_close(filter2d(image, per_image), golden["degradation.filtered_pair"], "filtered_pair")
    assert_close(filter2d(image, kernels[p["filter_single"]]), golden["degradation.filtered_single"],
                 "filtered_single")
    usm = p["usm"]
    sharpened = usm_sharpen(golden["degradation.usm_input"], usm["radius"], usm["weight"], usm["threshold"])
    assert_close(sharpened, golden["degradation.usm_output"], "usm_output")


@torch.inference_mode()
def test_ddim_step(golden, stablesr):
    """One guided DDIM step (the official negative-prompt script's), and DDIM's tables: every stored
    `ddim_*` table by its reference buffer name (ints exactly, floats within the tolerance)."""
    needs_case(golden, "ddim_step")
    p = golden.params("ddim_step")
    cfg = golden.config.diffusion
    assert p.get("parameterization", cfg.parameterization) == cfg.parameterization
    ddim = DDIMSchedule(Schedule.from_config(cfg), p["steps"], p["eta"])
    tables = [name for name in golden.names("ddim_step") if name.startswith("ddim_")]
    assert tables, f"golden set {golden.path}: the ddim_step case stores no DDIM table"
    for name in tables:
        assert name in DDIM_TABLES, f"unknown DDIM table {name!r}"
        ours, ref = getattr(ddim, name), golden[f"ddim_step.{name}"]
        if not ref.any():  # eta 0 stores all-zero sigmas, whose relative error is undefined: exact zeros
            assert not ours.any(), f"{name}: {ours.tolist()} != 0"
        elif ref.dtype.is_floating_point:
            assert_close(ours, ref, name)
        else:
            assert torch.equal(ours, ref.to(ours.dtype)), f"{name}: {ours.tolist()} != {ref.tolist()}"
    denoise = make_denoiser(stablesr, golden["ddim_step.context"], golden["ddim_step.negative_context"], p["scale"])
    x_prev, pred_x0 = ddim_step(ddim, golden["ddim_step.x"], golden["ddim_step.lr_latent"], p["index"], denoise,
                                golden["ddim_step.noise"], timestep=p["timestep"], tile=p["tile"],
                                overlap=p["overlap"], weights=golden["ddim_step.tile_weights"])
    assert_close(pred_x0, golden["ddim_step.pred_x0"], "pred_x0")
    assert_close(x_prev, golden["ddim_step.x_prev"], "x_prev")

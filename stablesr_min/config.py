"""One dataclass per network, defaulting to the official StableSR-512 values.

The defaults come from the reference repo's `configs/stableSRNew/v2-finetune_text_T_512.yaml` (UNet,
time-aware encoder, VAE, text encoder, diffusion schedule) and
`configs/autoencoder/autoencoder_kl_64x64x4_resi.yaml` (CFW). Field names follow those yaml files, so a
`config` block of a golden set (or a `--config` JSON written by this project) maps onto them one to one.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import ConfigError


SCALE = 4  # StableSR's upscaling factor: it is trained on LR = HR / 4 and used at x4

@dataclass
class VAEConfig:
    """AutoencoderKL (`first_stage_model.`): the SD 2.x VAE, 8x down, 4 latent channels."""

    in_channels: int = 3  # image channels in
    out_ch: int = 3  # image channels out
    ch: int = 128  # base width of the encoder/decoder
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)  # width multiplier per resolution level (len-1 downsamples)
    num_res_blocks: int = 2  # residual blocks per level (the decoder uses one more)
    attn_resolutions: tuple[int, ...] = ()  # feature sizes (relative to `resolution`) with self-attention
    resolution: int = 512  # nominal image size; only used to place `attn_resolutions`
    z_channels: int = 4  # channels of the encoder output / decoder input
    embed_dim: int = 4  # latent channels after quant_conv
    norm_groups: int = 32  # GroupNorm groups (SD: 32, so 4 channels per group at width 128; at width 32, 32
    #                        groups would normalise each channel alone and erase its mean: a crop's colour)

    @property
    def downscale(self) -> int:
        """Pixels per latent cell along each side: 2 per level after the first (8 for SD)."""
        return 2 ** (len(self.ch_mult) - 1)


@dataclass
class CFWConfig(VAEConfig):
    """The CFW autoencoder (`vqgan_cfw_00011.ckpt`): the VAE plus fusion layers in the decoder (Sec. 3.2)."""

    num_fuse_block: int = 2  # RRDB blocks inside each fusion layer
    num_grow_ch: int = 32  # growth channels of each RRDB's dense blocks


@dataclass
class UNetConfig:
    """The SD 2.x denoising UNet with SFT modulation (`model.diffusion_model.`, `UNetModelDualcondV2`)."""

    in_channels: int = 4  # latent channels in
    out_channels: int = 4  # predicted eps (or v) channels
    model_channels: int = 320  # base width
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # width multiplier per level
    num_res_blocks: int = 2  # residual blocks per level on the way down (one more on the way up)
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsample rates that get a spatial transformer
    num_heads: int = -1  # attention heads; -1: derive from num_head_channels
    num_head_channels: int = 64  # channels per head (SD 2.x); -1: use num_heads
    transformer_depth: int = 1  # transformer blocks per spatial transformer
    context_dim: int = 1024  # width of the text context (OpenCLIP ViT-H/14)
    use_linear_in_transformer: bool = True  # SD 2.x: proj_in/proj_out are Linear, not 1x1 conv
    semb_channels: int = 256  # channels of the time-aware encoder's features (SFT input)
    use_sft: bool = True  # False builds the plain SD 2.x UNet (no `spade` modules)
    norm_groups: int = 32  # GroupNorm groups (SD: 32, 10+ channels per group). One channel per group would
    #                        subtract the time embedding, a per-channel constant, right after adding it
    #                        (unet.time_blind_blocks): keep several channels per group


@dataclass
class TimeEncoderConfig:
    """The time-aware encoder (`structcond_stage_model.`, `EncoderUNetModelWT`), paper Sec. 3.1."""

    in_channels: int = 4  # LR latent channels
    model_channels: int = 256  # base width
    out_channels: int = 256  # width of every output feature (= UNetConfig.semb_channels)
    channel_mult: tuple[int, ...] = (1, 1, 2, 2)  # width multiplier per level
    num_res_blocks: int = 2  # residual blocks per level
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsample rates with self-attention
    num_heads: int = 4  # attention heads
    num_head_channels: int = -1  # -1: use num_heads
    time_aware: bool = True  # False: the encoder is always given t = 0 (the paper's time-blind ablation)
    norm_groups: int = 32  # GroupNorm groups, as UNetConfig.norm_groups (official: 32, 8+ channels per group)


@dataclass
class TextConfig:
    """The OpenCLIP ViT-H/14 text tower as SD 2.x uses it (`cond_stage_model.model.`)."""

    vocab_size: int = 49408  # BPE vocabulary + start/end tokens
    context_length: int = 77  # tokens per prompt
    width: int = 1024  # transformer width (= UNetConfig.context_dim)
    heads: int = 16  # attention heads
    layers: int = 24  # transformer blocks stored in the checkpoint
    layer: str = "penultimate"  # output of which block: "last" or "penultimate" (SD 2.x skips the last)
    mlp_ratio: float = 4.0  # feed-forward width / width
    embed_dim: int = 1024  # width of CLIP's contrastive head: text_projection is (width, embed_dim)


@dataclass
class DiffusionConfig:
    """The DDPM forward process and how the UNet output is read."""

    timesteps: int = 1000  # training steps T
    linear_start: float = 0.00085  # beta_1 (SD's "linear" schedule is linear in sqrt(beta))
    linear_end: float = 0.012  # beta_T
    parameterization: str = "eps"  # "eps" (StableSR-512) or "v" (the 768v model)
    scale_factor: float = 0.18215  # latent = scale_factor * VAE posterior sample


@dataclass
class StableSRConfig:
    """Everything the StableSR checkpoint and the CFW checkpoint need."""

    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    time_encoder: TimeEncoderConfig = field(default_factory=TimeEncoderConfig)
    text: TextConfig = field(default_factory=TextConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    cfw: CFWConfig = field(default_factory=CFWConfig)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StableSRConfig":
        """Build from a golden set's `config` block, or from `to_dict()` output.

        Flat diffusion keys (`parameterization`, `scale_factor`, ...) may sit at the top level, as in
        cases.json. The CFW autoencoder shares the VAE's widths unless its block sets its own. Every field is
        checked here, once: a block or field the config has not, or a value that cannot build the networks, is
        a ConfigError naming it (`vae.ch_mult must be ...`).
        """
        if not isinstance(d, Mapping):
            raise ConfigError("config", f"must be a JSON object of blocks ({', '.join(BLOCKS)}), got {json.dumps(d)}")
        d = dict(d)
        diffusion = _block(d.pop("diffusion", {}), "diffusion")
        for name in _field_names(DiffusionConfig):
            if name in d:
                diffusion[name] = d.pop(name)
        vae = _build(VAEConfig, d.pop("vae", {}), "vae")
        cfw_block = {**dataclasses.asdict(vae), **_block(d.pop("cfw", {}), "cfw")}
        cfg = cls(
            diffusion=_build(DiffusionConfig, diffusion, "diffusion"),
            unet=_build(UNetConfig, d.pop("unet", {}), "unet"),
            time_encoder=_build(TimeEncoderConfig, d.pop("time_encoder", {}), "time_encoder"),
            text=_build(TextConfig, d.pop("text", {}), "text"),
            vae=vae,
            cfw=_build(CFWConfig, cfw_block, "cfw"),
        )
        if d:
            raise ConfigError(sorted(d)[0], f"is not a block of the config (the blocks: {', '.join(BLOCKS)}; or a "
                                            "diffusion field)")
        _check_groups(cfg)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "StableSRConfig":
        return cls.from_dict(json.loads(text))


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


BLOCKS = ("diffusion", "unet", "time_encoder", "text", "vae", "cfw")  # StableSRConfig's fields
CHOICES = {"layer": ("last", "penultimate"), "parameterization": ("eps", "v")}
HEADS = ("num_heads", "num_head_channels")  # -1: derived from the other one


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON's true is no number


def _checked(f: dataclasses.Field, value: Any, where: str) -> Any:
    """A field's value as its dataclass holds it, or a ConfigError naming the field."""
    name = f"{where}.{f.name}"
    if f.type == "bool":
        if not isinstance(value, bool):
            raise ConfigError(name, f"must be true or false, got {json.dumps(value)}")
    elif f.type == "int":
        least = -1 if f.name in HEADS else 1
        if not _is_int(value) or value < least or value == 0:
            raise ConfigError(name, f"must be a whole number >= 1{' (or -1)' if least < 0 else ''}, got "
                                    f"{json.dumps(value)}")
    elif f.type == "float":
        if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(value) or value < 0:
            raise ConfigError(name, f"must be a finite number >= 0, got {json.dumps(value)}")
        value = float(value)
    elif f.type == "str":
        if value not in CHOICES[f.name]:
            raise ConfigError(name, f"must be one of {', '.join(CHOICES[f.name])}, got {json.dumps(value)}")
    elif f.type == "tuple[int, ...]":
        levels = "mult" in f.name  # a multiplier per level: at least one level
        if (not isinstance(value, (list, tuple)) or not all(_is_int(v) and v >= 1 for v in value)
                or (levels and not value)):
            raise ConfigError(name, f"must be {'a non-empty' if levels else 'a'} list of whole numbers >= 1, got "
                                    f"{json.dumps(value)}")
        value = tuple(value)
    return value


def _block(block: Any, where: str) -> dict[str, Any]:
    if not isinstance(block, Mapping):
        raise ConfigError(where, f"must be an object of fields, got {json.dumps(block)}")
    return dict(block)


def _build(cls, block: Any, where: str):
    """The `where` block of a config as a `cls`, each field checked (`_checked`); a field it has not is refused."""
    block = _block(block, where)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(block) - fields.keys())
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}", f"is not a field of the config (its {where} fields: "
                                                   f"{', '.join(fields)})")
    return cls(**{name: _checked(fields[name], value, where) for name, value in block.items()})


def _check_groups(cfg: "StableSRConfig") -> None:
    """Every width a GroupNorm normalises must split into its groups: refused naming the block's fields."""
    widths = {"vae": ("ch", "ch_mult"), "cfw": ("ch", "ch_mult"), "unet": ("model_channels", "channel_mult"),
              "time_encoder": ("model_channels", "channel_mult")}
    for block, (base_name, mult_name) in widths.items():
        part = getattr(cfg, block)
        base, groups = getattr(part, base_name), part.norm_groups
        for m in (1, *getattr(part, mult_name)):
            if base * m % groups:
                raise ConfigError(f"{block}.{base_name}", f"{base} (x {block}.{mult_name} {m}) must be a multiple of "
                                                          f"{block}.norm_groups ({groups}), which normalise its width")


# ------------------------------------------------------------------------------------------------------
# The tiny sizes this project trains and ships (`train vae`, `train unet`, scripts/train_tiny.py, tiny/)

# Overrides of the official sizes above. Every width is a multiple of the networks' GroupNorm groups.
# Chosen to train in tens of minutes on a 2-core CPU (docs/training.md, "Training a tiny prior"):
TINY_SIZES = {
    # VAE: 3 levels, so 4x down (SD: 8x) with 4 latent channels: 48 values per latent cell -> 4 (SD: 192 -> 4).
    # A tiny decoder trained for minutes cannot invent the detail that 8x would throw away (LDM's
    # autoencoder zoo, Table 8: reconstructions worsen as the factor grows); widths 32, 64, 64, one residual
    # block per level.
    # 8 GroupNorm groups: 4 channels per group as SD's VAE has at width 128 (32 groups at width 32 would
    # normalise each channel on its own, erasing its mean: the decoder then loses a crop's colour).
    "vae": {"ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "norm_groups": 8},
    # UNet: widths 32, 64, 64, one residual block per level, attention below the top level (SD: 320 ... 1280,
    # two blocks, attention at every level); heads of 32 channels.
    # 8 GroupNorm groups, for the same reason and one more: a ResBlock adds the time embedding per channel just
    # before a GroupNorm, and with one channel per group (32 groups at width 32) the norm subtracts it again,
    # so the UNet and the time-aware encoder could not see t (`model.time_blind_layers`; MODEL_CARD.md).
    "unet": {"model_channels": 32, "channel_mult": [1, 2, 2], "num_res_blocks": 1, "attention_resolutions": [2, 4],
             "num_head_channels": 32, "context_dim": 32, "semb_channels": 32, "use_sft": False, "norm_groups": 8},
    # CFW fusion layers (added by `train cfw`): the official sizes, two RRDBs of growth 32. At this model's
    # sizes CFW is its path to fidelity; one RRDB of growth 16 (a third of the parameters, twice as fast)
    # scored 0.05 dB lower on the training crops (tiny/MODEL_CARD.md).
    "cfw": {"num_fuse_block": 2, "num_grow_ch": 32},
    # Text encoder: width 32, 2 blocks (the penultimate one's output is used, as SD 2.x), the BPE vocabulary
    # and 77 tokens as CLIP's.
    "text": {"width": 32, "heads": 2, "layers": 2, "embed_dim": 32},
}


def matching_time_encoder(unet: UNetConfig) -> dict[str, Any]:
    """The time-aware encoder that `train sr` will add, sized to the UNet as the official one is to SD's:
    one level per UNet level (so it has a feature for every UNet resolution), half the UNet's multipliers
    ((1, 2, 4, 4) -> (1, 1, 2, 2)), attention where the UNet has it, and features of the SFT input width."""
    return {"model_channels": unet.model_channels, "out_channels": unet.semb_channels,
            "channel_mult": [max(1, m // 2) for m in unet.channel_mult],
            "num_res_blocks": unet.num_res_blocks, "attention_resolutions": list(unet.attention_resolutions),
            "norm_groups": unet.norm_groups}

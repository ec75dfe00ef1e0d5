"""The full-size models have exactly the official checkpoints' keys and shapes (meta device: no memory).

`official_manifest.json` lists every state-dict entry of `stablesr_000117`, `sd21_base_512` and
`vqgan_cfw_00011`. Each prefix below is built at the default (official) config and compared exactly.
"""

import json
from pathlib import Path

import pytest
import torch

from stablesr_min.cfw import CFWAutoencoder
from stablesr_min.config import StableSRConfig, UNetConfig
from stablesr_min.text import TextEncoder
from stablesr_min.time_encoder import TimeAwareEncoder
from stablesr_min.unet import UNet
from stablesr_min.vae import AutoencoderKL
from stablesr_min.weights import check_keys, is_ignorable

MANIFEST = json.loads((Path(__file__).parent / "golden" / "official_manifest.json").read_text())
CFG = StableSRConfig()

# (checkpoint, key prefix) -> a builder of the module that owns the keys under that prefix.
BUILDERS = {
    ("stablesr_000117", "first_stage_model."): lambda: AutoencoderKL(CFG.vae),
    ("sd21_base_512", "first_stage_model."): lambda: AutoencoderKL(CFG.vae),
    ("stablesr_000117", "cond_stage_model.model."): lambda: TextEncoder(CFG.text),
    ("sd21_base_512", "cond_stage_model.model."): lambda: TextEncoder(CFG.text),
    ("vqgan_cfw_00011", ""): lambda: CFWAutoencoder(CFG.cfw),
    ("stablesr_000117", "model.diffusion_model."): lambda: UNet(CFG.unet),
    ("sd21_base_512", "model.diffusion_model."): lambda: UNet(UNetConfig(use_sft=False)),
    ("stablesr_000117", "structcond_stage_model."): lambda: TimeAwareEncoder(CFG.time_encoder),
}


def section(checkpoint: str, prefix: str) -> dict:
    return {key[len(prefix):]: shape for key, shape in MANIFEST[checkpoint].items() if key.startswith(prefix)}


@pytest.mark.parametrize("checkpoint,prefix", list(BUILDERS), ids=lambda x: x)
def test_prefix_matches_official(checkpoint, prefix):
    with torch.device("meta"):
        module = BUILDERS[(checkpoint, prefix)]()
    ours = {k: list(v.shape) for k, v in module.state_dict().items()}
    # "file" = the official manifest, "model" = ours, in check_keys' wording
    missing, unexpected, misshaped = check_keys(ours, section(checkpoint, prefix))
    assert (missing, unexpected, misshaped) == ([], [], []), f"{checkpoint} {prefix}"


def test_text_projection_is_width_by_embed_dim():
    """OpenCLIP's contrastive head is (width, embed_dim): 1024 x 1024 for ViT-H/14."""
    with torch.device("meta"):
        text = TextEncoder(CFG.text)
    assert list(text.text_projection.shape) == [CFG.text.width, CFG.text.embed_dim] == [1024, 1024]


@pytest.mark.parametrize("checkpoint", ["stablesr_000117", "sd21_base_512", "vqgan_cfw_00011"])
def test_every_official_key_has_an_owner(checkpoint):
    prefixes = tuple(p for c, p in BUILDERS if c == checkpoint)
    orphans = [k for k in MANIFEST[checkpoint] if not k.startswith(prefixes) and not is_ignorable(k)]
    assert orphans == []

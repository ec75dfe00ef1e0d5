"""stablesr-min: StableSR (Wang et al., "Exploiting Diffusion Prior for Real-World Image Super-Resolution",
IJCV 2024) in plain PyTorch. The public API, for a first upscale in Python:

    choice = find_weights()                         which files: $STABLESR_WEIGHTS, else the shipped tiny model
    opts = UpscaleOptions(**sampling_defaults(choice.stablesr))  the settings stored with them, else the paper's
    model = load_stablesr(choice.stablesr)          the StableSR checkpoint, loaded strictly (model.py)
    cfw = load_cfw(choice.cfw)                      the CFW autoencoder (model.py)
    sr = StableSRPipeline(model, cfw)(lr, opts)     lr in [-1, 1] -> the x4 image in [0, 1]

and the pieces a student reads: StableSRConfig (config.py), the networks AutoencoderKL (vae.py), UNet (unet.py),
TimeAwareEncoder (time_encoder.py), CFWAutoencoder (cfw.py), TextEncoder (text.py), and StableSR (model.py),
the module tree whose names are the checkpoint's keys. The names load on first use, so that importing the
package (and `python -m stablesr_min --help`) stays fast.
"""

import importlib

API = {"find_weights": "tiny", "sampling_defaults": "tiny", "load_stablesr": "model", "load_cfw": "model",
       "StableSR": "model", "StableSRPipeline": "pipeline", "UpscaleOptions": "pipeline", "StableSRConfig": "config",
       "AutoencoderKL": "vae", "UNet": "unet", "TimeAwareEncoder": "time_encoder", "CFWAutoencoder": "cfw",
       "TextEncoder": "text"}
__all__ = sorted(API)


def __getattr__(name: str):
    if name not in API:
        raise AttributeError(f"module 'stablesr_min' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{API[name]}", __name__), name)

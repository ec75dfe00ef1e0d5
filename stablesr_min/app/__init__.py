"""The application: the third layer. It imports the model and training layers; only `__main__` imports it.

    cli.py       `python -m stablesr_min ...`: the only user of argparse, one-line errors, exit codes
    settings.py  what `upscale` and `evaluate` share: which weights, which sampling settings
    convert.py   the official `.ckpt` files to safetensors, with an allow-list unpickler
    evaluate.py  PSNR/SSIM against bicubic on degraded crops (`evaluate`)
    metrics.py   PSNR, SSIM and the notebooks' measures, each tested on cases with a known answer
    analysis.py  the measurements behind the notebooks in notebooks/
"""

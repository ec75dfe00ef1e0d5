"""The application: the third layer. It imports the model and training layers; only `__main__` imports it.

    cli.py       `python -m stablesr_min ...`: every parser (the only user of argparse), the step from its
                 namespace to the options of the layers below, one-line errors, exit codes
    signals.py   Ctrl-C and SIGTERM from the first moment (`__main__` starts there, before torch imports)
    settings.py  what `upscale` and `evaluate` share: which weights, which sampling settings, loading them
    convert.py   the official `.ckpt` files to safetensors, with an allow-list unpickler
    evaluate.py  PSNR, SSIM and colour error against bicubic on degraded crops (`evaluate`)
    metrics.py   PSNR, SSIM and the notebooks' measures, each tested on cases with a known answer
    analysis.py  the measurements behind the notebooks in notebooks/
"""

"""Training StableSR: the second layer. It imports the model (the package's top level), never the application.

    sr.py        Sec. 3.1: fine-tuning the time-aware encoder and SFT layers on a frozen prior (`train sr`)
    cfw_data.py  Sec. 3.2: the (LR, GT, sampled latent) triples CFW trains on (`train cfw-data`)
    cfw.py       Sec. 3.2: training CFW's fusion layers (`train cfw`), with its loss in cfw_loss.py
    prior.py     a tiny diffusion prior of one's own: a VAE, then a UNet (`train vae`, `train unet`)
    data.py      photos -> crops, and the Real-ESRGAN LR/HR pairs of `degradation.py`

and what every trainer shares, each by its subject:

    options.py     the options every command has, and which of them a resumed run keeps
    run_folder.py  a run's folder: its checkpoint, resume state, log and lock
    processes.py   several processes under torchrun, and the seeds of a run's random streams
    loop.py        the loop's bookkeeping (steps, log, validation, saving, Ctrl-C) and a run's start and end
    networks.py    initialising and checking the networks a trainer builds
"""

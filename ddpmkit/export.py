"""Export to other tools: a diffusers ``DDPMPipeline`` folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ddpmkit.diffusion import DIFFUSERS_PREDICTION
from ddpmkit.errors import DdpmkitError

# ddpmkit prediction target → diffusers prediction_type (export and the solver samplers)


def export_diffusers(pipe, out: str | os.PathLike) -> Path:
    """Write ``out`` so that ``diffusers.DDPMPipeline.from_pretrained(out)`` loads the model.

    The predictor must wrap a diffusers ``UNet2DModel`` (attribute ``unet``, as ``unet2d`` does) with nothing
    around it (no ``stem``).
    The scheduler gets the run's exact betas, variance type, clipping and prediction target.
    The folder is written next to ``out`` and renamed into place when complete.
    """
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    if getattr(pipe.diffusion, "continuous", False):
        raise DdpmkitError(f"export to diffusers writes a DDPMPipeline, which runs the vp process; this run's process "
                           f"is '{pipe.diffusion.name}'")
    unet = getattr(pipe.model, "unet", None)
    if not isinstance(unet, UNet2DModel):
        raise DdpmkitError(f"export to diffusers needs a predictor wrapping UNet2DModel (such as unet2d); "
                           f"this run uses '{pipe.config.predictor.name}'")
    stem = getattr(pipe.model, "stem", None)  # unet2d: the U-Net works behind a patch_size/pad stem
    if stem:
        raise DdpmkitError("export to diffusers: this U-Net works behind a space-to-depth stem ("
                           + ", ".join(f"{k}={v}" for k, v in stem.items()) + "), which DDPMPipeline cannot run; "
                           "train with --preset tiny or --set predictor.patch_size=1 --set predictor.pad=0 to export")
    d = pipe.diffusion
    scheduler = DDPMScheduler(num_train_timesteps=d.num_timesteps, trained_betas=d.betas.tolist(),
                              variance_type=d.variance_type, clip_sample=d.clip_sample,
                              clip_sample_range=d.clip_range, prediction_type=DIFFUSERS_PREDICTION[d.prediction])
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DdpmkitError(f"'{out}' exists and is not empty; choose a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700: give the mode an ordinary folder gets
    try:
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(tmp), safe_serialization=True)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def diffusers_call(pipe) -> str:
    """The ``DDPMPipeline`` call that reproduces ddpmkit's sampling (Algorithm 2 over all T steps;
    diffusers' default of 1000 steps fails for T < 1000 and strides for T > 1000)."""
    return f"DDPMPipeline.from_pretrained(OUT)(batch_size=16, num_inference_steps={pipe.diffusion.num_timesteps})"

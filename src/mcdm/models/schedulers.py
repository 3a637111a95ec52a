"""The noise schedule of the base UNet: SD-1.5's DDPM training schedule."""
from __future__ import annotations

# SD-1.5's scheduler_config.json (the DDPM training schedule its UNet was trained with)
SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    steps_offset=1,
    prediction_type="epsilon",
)


def make_scheduler(prediction_type: str = "epsilon"):
    """SD-1.5's DDPM training schedule, predicting ``prediction_type`` (SD-1.5: epsilon)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**{**SD15_SCHEDULER, "prediction_type": prediction_type})

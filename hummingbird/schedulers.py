"""The two samplers, as configured diffusers schedulers.

Both models were trained with 1000 steps of "scaled linear" betas 0.00085 -> 0.012 and predict the
noise (epsilon).

- Hummingbird: LCM multistep (``LCMScheduler``), boundary scalings sigma_data 0.5 / timestep scale
  10 as in its consistency distillation. diffusers' LCM step is the distillation's step; only its
  timestep *spacing* differs (see :func:`lcm_timesteps`), so the pipeline passes the timesteps in.
- VideoCrafter2: DDIM 50 steps, eta 1.0 (``DDIMScheduler``). VideoCrafter2's "uniform" DDIM grid is
  ``range(0, 1000, 1000 // n) + 1`` and its last step goes to alpha_cumprod[0]; in diffusers terms
  that is ``timestep_spacing="leading"``, ``steps_offset=1``, ``set_alpha_to_one=False``, for step
  counts n that divide 1000 (its 50 among them). For other n that range holds more than n steps
  (n = 30: 31, the highest at t = 991), and diffusers samples exactly n (the highest at t = 958).
"""
import inspect

import diffusers
import numpy as np
from diffusers import DDIMScheduler, LCMScheduler

TRAIN_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
)

DDIM_ETA = 1.0  # VideoCrafter2's reference sampling adds fresh noise at every step


def lcm_scheduler(original_inference_steps: int = 50) -> LCMScheduler:
    return LCMScheduler(**TRAIN_SCHEDULE, original_inference_steps=original_inference_steps, timestep_scaling=10.0)


def ddim_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**TRAIN_SCHEDULE, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")


def scheduler_for(time_cond_proj_dim):
    """The sampler a U-Net implies: LCM for one with a guidance embedding (time_cond_proj_dim, Hummingbird),
    DDIM otherwise (VideoCrafter2)."""
    return lcm_scheduler() if time_cond_proj_dim is not None else ddim_scheduler()


def max_inference_steps(config, scheduler_class=None) -> int:
    """The most steps a scheduler with this config samples: a consistency scheduler's distillation grid
    (original_inference_steps: LCM, TCD); otherwise every training timestep once, less the steps_offset
    of "leading" spacing, whose timesteps ``range(0, T, T // n) + offset`` would reach T itself.

    scheduler_class: the class the config belongs to (default: the config's ``_class_name``, as a saved
    scheduler_config.json has it). ``DDIMScheduler.from_config(lcm.config)`` keeps the LCM's
    original_inference_steps in its config, unused: only a class that takes it samples on that grid."""
    if scheduler_class is None and config.get("_class_name"):
        scheduler_class = getattr(diffusers, config["_class_name"], None)
    takes_grid = scheduler_class is None or "original_inference_steps" in inspect.signature(scheduler_class).parameters
    if "original_inference_steps" in config and takes_grid:
        return config["original_inference_steps"]
    leading = config.get("timestep_spacing", "leading") == "leading"
    return config["num_train_timesteps"] - (config.get("steps_offset", 0) if leading else 0)


def lcm_timesteps(num_inference_steps: int, original_inference_steps: int = 50,
                  num_train_timesteps: int = 1000) -> list:
    """Hummingbird's (and T2V-Turbo's / the original LCM code's) multistep schedule: every
    ``original // n``-th step of the distillation grid ``k - 1, 2k - 1, ..., 999`` (k = 1000 // original),
    counted down from 999. 4 steps of 50 -> [999, 759, 519, 279].

    diffusers' ``LCMScheduler.set_timesteps(n)`` now spreads the n steps over the whole grid
    (``linspace`` of indices), which gives [999, 759, 499, 259] for 4 steps: not what the model was
    distilled and evaluated with, hence this function.
    """
    if not 1 <= num_inference_steps <= original_inference_steps:
        raise ValueError(f"num_inference_steps must be in [1, {original_inference_steps}] "
                         f"(original_inference_steps), got {num_inference_steps}")
    k = num_train_timesteps // original_inference_steps
    grid = np.arange(1, original_inference_steps + 1) * k - 1
    skip = original_inference_steps // num_inference_steps
    return grid[::-skip][:num_inference_steps].tolist()

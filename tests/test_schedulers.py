"""The two samplers' configurations against the facts of the original code."""
import pytest
import torch

from hummingbird.schedulers import ddim_scheduler, lcm_scheduler, lcm_timesteps, max_inference_steps


def test_lcm_timesteps_match_hummingbird():
    assert lcm_timesteps(4) == [999, 759, 519, 279]
    assert lcm_timesteps(8) == [999, 879, 759, 639, 519, 399, 279, 159]  # the shipped 8-step default
    assert lcm_timesteps(1) == [999]
    assert lcm_timesteps(50) == list(range(999, 0, -20))


@pytest.mark.parametrize("steps", [0, 51])
def test_lcm_timesteps_out_of_range(steps):
    with pytest.raises(ValueError, match="num_inference_steps"):
        lcm_timesteps(steps)


def test_lcm_scheduler_accepts_hummingbird_timesteps():
    sched = lcm_scheduler()
    sched.set_timesteps(timesteps=lcm_timesteps(4))
    assert sched.timesteps.tolist() == [999, 759, 519, 279]
    # Consistency-model boundary scalings of the distillation (sigma_data 0.5, timestep scale 10):
    # c_skip = 0.25 / ((10 t)^2 + 0.25), c_out = 10 t / sqrt((10 t)^2 + 0.25). Near t = 0 the scale
    # matters: at t = 1, c_skip is 0.0025 with scale 10 but 0.2 with scale 1.
    assert sched.config.timestep_scaling == 10
    c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(1)
    assert c_skip == pytest.approx(0.25 / 100.25) and c_out == pytest.approx(10 / 100.25**0.5)
    c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(279)  # ~0 and ~1 away from t = 0
    assert c_skip < 1e-4 and c_out == pytest.approx(1.0, abs=1e-4)


def test_lcm_last_step_returns_denoised():
    sched = lcm_scheduler()
    sched.set_timesteps(timesteps=lcm_timesteps(2))
    x, eps = torch.randn(1, 4, 2, 4, 4), torch.randn(1, 4, 2, 4, 4)
    for t in sched.timesteps:
        out = sched.step(eps, t, x, generator=torch.Generator().manual_seed(0))
        x = out.prev_sample
    assert torch.equal(out.prev_sample, out.denoised)


def test_training_schedule():
    for sched in (lcm_scheduler(), ddim_scheduler()):
        assert sched.config.num_train_timesteps == 1000 and sched.config.prediction_type == "epsilon"
        assert sched.betas[0].item() == pytest.approx(0.00085) and sched.betas[-1].item() == pytest.approx(0.012)


def test_ddim_matches_videocrafter2_grid():
    sched = ddim_scheduler()
    sched.set_timesteps(50)
    assert sched.timesteps.tolist() == list(range(981, 0, -20))  # VideoCrafter2: range(0, 1000, 20) + 1
    assert sched.final_alpha_cumprod == sched.alphas_cumprod[0]  # its last step lands on alpha_cumprod[0]
    for n in (4, 8, 25, 40, 125, 200):  # every step count dividing 1000 (see the module's docstring)
        sched.set_timesteps(n)
        assert sched.timesteps.tolist() == [t + 1 for t in reversed(range(0, 1000, 1000 // n))], n


def test_ddim_betas_are_scaled_linear():
    """Stable Diffusion's "scaled_linear" betas (a "linear" schedule has the same first and last beta)."""
    want = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    for sched in (ddim_scheduler(), lcm_scheduler()):
        torch.testing.assert_close(sched.betas.double(), want, rtol=1e-5, atol=0)


def test_max_inference_steps_stay_on_the_training_schedule():
    """At the most steps each scheduler allows, every timestep indexes the training schedule; DDIM with
    "leading" spacing and steps_offset 1 would reach timestep 1000 at 1000 steps."""
    ddim = ddim_scheduler()
    most = max_inference_steps(ddim.config)
    ddim.set_timesteps(most)
    assert most == 999 and ddim.timesteps.max() == 999
    ddim.set_timesteps(most + 1)
    assert ddim.timesteps.max() == 1000  # what the pipeline refuses
    assert max_inference_steps(lcm_scheduler(original_inference_steps=8).config) == 8

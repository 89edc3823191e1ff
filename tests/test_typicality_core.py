"""The batched typicality path equals a naive reference: one image, one draw, one condition per pass."""

import numpy as np
import pytest
import torch

from diffmine.models.tiny import TinyBackend, TinyConfig
from diffmine.typicality import compiled, condition_errors, draw_noise, draw_units, typicality_from_errors

SMALL = TinyConfig(block_out_channels=(16, 32, 32), cross_attention_dim=16, attention_head_dim=4, prompt_tokens=2)


@pytest.fixture(scope="module")
def backend():
    b = TinyBackend(["A", "B", "null"], SMALL, seed=0)
    b.denoiser.eval()
    return b


def naive_typicality(backend, latents, cond_prompts, null_prompt, timesteps, noise):
    """The definition, written out: one forward pass per (image, draw, condition)."""
    out = torch.zeros(latents.shape[0], *latents.shape[2:])
    alphas = backend.scheduler.alphas_cumprod
    with torch.inference_mode():
        for b in range(latents.shape[0]):
            for k in range(len(timesteps)):
                t = timesteps[k:k + 1]
                noisy = backend.scheduler.add_noise(latents[b:b + 1], noise[k:k + 1], t)
                losses = []
                for prompt in (cond_prompts[b], null_prompt):
                    pred = backend.unet(noisy, t, encoder_hidden_states=backend.encode_prompts([prompt])).sample
                    losses.append((pred - noise[k:k + 1]).pow(2).mean(1)[0])
                out[b] += losses[1] - losses[0]
    return out / len(timesteps)


def test_batched_equals_naive_reference(backend):
    torch.manual_seed(0)
    latents = torch.randn(3, 48, 8, 8)
    timesteps, noise = draw_noise(0, 5, (48, 8, 8), 1000)
    states = torch.stack([backend.encode_prompts(["A", "B", "A"]), backend.encode_prompts(["null"] * 3)], 1).detach()
    expected = naive_typicality(backend, latents, ["A", "B", "A"], "null", timesteps, noise)
    for batch_size in (2, 7, 64):  # split across passes in different ways
        got = typicality_from_errors(condition_errors(backend, latents, states, timesteps, noise, batch_size))
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_per_draw_errors_average_to_the_map_and_pair_up(backend):
    """The per-draw errors (for the standard error) are the same computation: their mean is the
    map, and the antithetic units are the pair means, whose mean is the map again (even K)."""
    torch.manual_seed(0)
    latents = torch.randn(2, 48, 8, 8)
    timesteps, noise = draw_noise(0, 6, (48, 8, 8), 1000)
    states = torch.stack([backend.encode_prompts(["A", "B"]), backend.encode_prompts(["null"] * 2)], 1).detach()
    mean = typicality_from_errors(condition_errors(backend, latents, states, timesteps, noise, 5))
    per_draw = typicality_from_errors(condition_errors(backend, latents, states, timesteps, noise, 5, per_draw=True))
    assert per_draw.shape == (2, 6, 8, 8)
    torch.testing.assert_close(per_draw.mean(1), mean, rtol=1e-5, atol=1e-6)
    units = draw_units(per_draw, "stratified-antithetic")
    assert units.shape == (2, 3, 8, 8)
    torch.testing.assert_close(units[:, 1], (per_draw[:, 2] + per_draw[:, 3]) / 2)
    torch.testing.assert_close(units.mean(1), mean, rtol=1e-5, atol=1e-6)
    assert draw_units(per_draw, "paper").shape == (2, 6, 8, 8)  # independent draws are units


def test_compiled_path_equals_the_reference():
    """torch.compile (frozen weights) with padded fixed-shape passes gives the naive maps."""
    # no attention levels: a smaller graph compiles in well under a minute; the mechanism (frozen
    # weights, padding of the short last pass, the eager UNet back afterwards) is the same
    backend = TinyBackend(["A", "B", "null"], TinyConfig(block_out_channels=(16, 32, 32), attention_levels=(False, False, False),
                                                         cross_attention_dim=16, attention_head_dim=4, prompt_tokens=2))
    backend.denoiser.eval()
    eager = backend.unet
    torch.manual_seed(0)
    latents = torch.randn(3, 48, 8, 8)
    timesteps, noise = draw_noise(0, 5, (48, 8, 8), 1000)
    states = torch.stack([backend.encode_prompts(["A", "B", "A"]), backend.encode_prompts(["null"] * 3)], 1).detach()
    expected = naive_typicality(backend, latents, ["A", "B", "A"], "null", timesteps, noise)
    with compiled(backend):
        assert backend.unet is not eager
        # 15 (image, draw) pairs in passes of 4 pairs: the last pass is padded from 3 to 4
        got = typicality_from_errors(condition_errors(backend, latents, states, timesteps, noise, 8, fixed_shape=True))
    assert backend.unet is eager
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_draws_depend_on_seed_and_shape_only():
    a = draw_noise(3, 8, (4, 6, 6), 1000)
    b = draw_noise(3, 8, (4, 6, 6), 1000)
    c = draw_noise(4, 8, (4, 6, 6), 1000)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


@pytest.mark.parametrize("estimator", ["paper", "stratified", "stratified-antithetic"])
def test_timesteps_stay_in_range_and_strata_cover_it(estimator):
    t, noise = draw_noise(0, 10, (4, 4, 4), 1000, 0.1, 0.7, estimator)
    assert t.min() >= 100 and t.max() < 700
    if estimator != "paper":
        strata = ((t - 100) // 60).tolist()
        assert sorted(strata) == list(range(10))  # one draw in each stratum
    if estimator == "stratified-antithetic":
        assert torch.equal(noise[1], -noise[0])

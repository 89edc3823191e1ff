"""The one interface both backends implement; the pipeline above it never asks which it has.

A backend is a conditional latent diffusion model in diffusers' terms: an image encoder into a
latent grid (SD's VAE, or a parameter-free pixel-unshuffle for the embedded model), a prompt
encoder (CLIP, or a learned table of prompt embeddings), a ``UNet2DConditionModel`` that predicts
the noise, and a DDPM noise schedule. Training, typicality, features and translation are written
once against this interface.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_write, write_json

BACKEND_FILE = "backend.json"
WEIGHTS_FILE = "trainable.safetensors"


def model_files(directory: Path) -> tuple[Path, Path]:
    """The files a saved model is: how to rebuild it (``BACKEND_FILE``) and its trained weights."""
    return directory / BACKEND_FILE, directory / WEIGHTS_FILE


class Denoiser(torch.nn.Module):
    """UNet + prompt encoder as one module: ``(noisy latents, timesteps, prompts) -> eps``.

    Training wraps this module (DDP, LoRA), so every trainable parameter, the embedded model's
    prompt table included, is seen by the engine.
    """

    def __init__(self, unet: torch.nn.Module, prompt_encoder: torch.nn.Module):
        super().__init__()
        self.unet = unet
        self.prompt_encoder = prompt_encoder

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, prompts: list[str] | torch.Tensor) -> torch.Tensor:
        """noisy (B, C, h, w), timesteps (B,), prompts: B strings or states (B, L, D) -> (B, C, h, w)."""
        states = prompts if isinstance(prompts, torch.Tensor) else self.prompt_encoder(prompts)
        return self.unet(noisy, timesteps, encoder_hidden_states=states.to(noisy.dtype)).sample


class Backend:
    #: image pixels per latent pixel along each side (8 for SD, 4 for the embedded model)
    latent_factor: int
    #: index into ``unet.up_blocks`` whose output serves as DIFT features
    default_feature_block: int
    #: the learning rate a finetune starts from when the user gives none
    default_learning_rate: float
    #: what ``backend.json`` records to rebuild this backend (weights excluded)
    spec: dict
    #: the model's own DDPM schedule (``alphas_cumprod``, ``add_noise``)
    scheduler: "diffusers.DDPMScheduler"
    denoiser: Denoiser

    @property
    def unet(self) -> "diffusers.UNet2DConditionModel":
        return self.denoiser.unet

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.unet.parameters()).dtype

    @property
    def inputs_per_pass(self) -> int:
        """UNet inputs per forward pass where a config leaves it to the backend (``batch_size=0``).

        A GPU wants large passes. On a CPU, passes whose activations stay in cache run faster per
        input: the embedded model reaches about 50% of the matmul peak at 48-96 inputs per pass
        and about 40% at 256 (benchmarks/README.md).
        """
        return 256 if self.device.type == "cuda" else 64

    def to(self, device: str | torch.device) -> "Backend":
        self.denoiser.to(device)
        return self

    def local_sources(self) -> dict[str, tuple[str, str]]:
        """``{source: (local folder, fingerprint of the files loaded from it)}`` of a pretrained
        model loaded from folders on this machine (``base``, ``text_encoder``); {} for one made
        here or loaded by hub id. What names an outside model by its files rather than its path."""
        return {}

    # -- encoders -------------------------------------------------------------------------
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> latents (B, C, H / f, W / f). Deterministic (no sampling)."""
        raise NotImplementedError

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`encode_images`: (B, C, h, w) -> (B, 3, h * f, w * f) in [-1, 1]."""
        raise NotImplementedError

    def calibrate(self, pixels: torch.Tensor) -> None:
        """Fit data-dependent encoder settings on a sample of training images (B, 3, H, W) in
        [-1, 1], before training. Pretrained encoders keep theirs: nothing to do by default."""

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Prompt strings -> ``encoder_hidden_states`` (B, L, D) for the UNet."""
        return self.denoiser.prompt_encoder(prompts)

    # -- training state -------------------------------------------------------------------
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The parameters training changes (full UNet, LoRA adapters, prompt table), by name."""
        return {n: p.detach() for n, p in self.denoiser.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.trainable_state())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ValueError(f"weights do not fit this model: {len(missing)} missing "
                             f"(e.g. {sorted(missing)[:3]}), {len(unexpected)} unexpected (e.g. {sorted(unexpected)[:3]})")
        self.denoiser.load_state_dict(state, strict=False)

    # -- persistence ----------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write ``backend.json`` (how to rebuild) and ``trainable.safetensors`` (the weights)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_weights(self.trainable_state(), directory / WEIGHTS_FILE)
        write_json(directory / BACKEND_FILE, self.spec)


def save_weights(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """safetensors, written atomically."""
    atomic_write(path, lambda tmp: save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, str(tmp)))


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))

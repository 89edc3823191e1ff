"""The embedded model: a small class-conditional latent diffusion model trained from scratch.

It needs no pretrained weights and trains on two CPU cores in minutes, so the whole pipeline runs
anywhere, offline. It keeps the structure that typicality relies on in Stable Diffusion:

- "latents" are the image pixel-unshuffled by ``latent_factor`` (lossless and parameter-free):
  a 64x64 RGB image becomes a 16x16 grid of 48 channels, so the typicality grid is coarser than
  the image, as with SD's VAE (8x);
- the denoiser is diffusers' ``UNet2DConditionModel`` with cross-attention;
- each prompt string it was built with (the label prompts and the null prompt) owns a few learned
  token embeddings, looked up by the exact string: the prompts used for training, typicality and
  features are necessarily the same.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel

from .base import Backend, Denoiser


@dataclass
class TinyConfig:
    latent_factor: int = 4
    # latents are multiplied by this (SD's VAE has its scaling_factor for the same reason): the
    # noise schedule assumes unit-variance data, and pixels in [-1, 1] have a smaller spread.
    # 0: calibrated on the training images before training (1 / their standard deviation)
    latent_scale: float = 0.0
    # the first level must be at least as wide as the latent (48 channels): a narrower one cannot
    # carry the noise through its skip connections, and the eps error stays >= 1/3 at every t
    block_out_channels: tuple[int, ...] = (64, 64, 64)
    layers_per_block: int = 1
    # attention only at 1/2 and 1/4 of the latent grid: self-attention over the full grid
    # dominates a small UNet's cost on the CPU (shared/reference.md)
    attention_levels: tuple[bool, ...] = (False, True, True)
    cross_attention_dim: int = 64
    attention_head_dim: int = 8
    prompt_tokens: int = 4
    # also add the pooled prompt embedding to the time embedding, so the label reaches every
    # resnet (including the full-resolution ones that have no cross-attention)
    prompt_in_time_embedding: bool = True
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02


class PromptTable(torch.nn.Module):
    """A learned embedding of ``tokens`` vectors per known prompt string."""

    def __init__(self, prompts: list[str], tokens: int, dim: int, seed: int):
        super().__init__()
        if len(set(prompts)) != len(prompts):
            raise ValueError(f"prompts must be distinct, got {prompts}")
        self.prompts = list(prompts)
        self._index = {p: i for i, p in enumerate(self.prompts)}
        generator = torch.Generator().manual_seed(seed)
        self.embeddings = torch.nn.Parameter(torch.randn(len(prompts), tokens, dim, generator=generator) * 0.5)

    def forward(self, prompts: list[str]) -> torch.Tensor:
        """B prompt strings -> (B, tokens, dim)."""
        try:
            index = [self._index[p] for p in prompts]
        except KeyError as exc:
            raise KeyError(f"the embedded model was trained with prompts {self.prompts}; "
                           f"it has no embedding for {exc.args[0]!r}") from None
        return self.embeddings[torch.tensor(index, device=self.embeddings.device)]


class TinyBackend(Backend):
    default_feature_block = 1
    default_learning_rate = 2e-3

    def __init__(self, prompts: list[str], config: TinyConfig | None = None, seed: int = 0):
        config = config or TinyConfig()
        self.config = config
        self.latent_factor = config.latent_factor
        channels = 3 * config.latent_factor ** 2
        down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in config.attention_levels)
        up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.attention_levels))
        torch.manual_seed(seed)  # diffusers initialises from the global generator
        unet = UNet2DConditionModel(
            in_channels=channels,
            out_channels=channels,
            down_block_types=down,
            up_block_types=up,
            block_out_channels=config.block_out_channels,
            layers_per_block=config.layers_per_block,
            cross_attention_dim=config.cross_attention_dim,
            attention_head_dim=config.attention_head_dim,
            norm_num_groups=min(32, config.block_out_channels[0] // 2),
            addition_embed_type="text" if config.prompt_in_time_embedding else None,
            addition_embed_type_num_heads=config.cross_attention_dim // config.attention_head_dim,
        )
        table = PromptTable(prompts, config.prompt_tokens, config.cross_attention_dim, seed + 1)
        self.denoiser = Denoiser(unet, table)
        self.scheduler = DDPMScheduler(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
                                       beta_start=config.beta_start, beta_end=config.beta_end)
        self.spec = {"kind": "tiny", "prompts": list(prompts), "config": asdict(config)}

    @classmethod
    def from_spec(cls, spec: dict) -> "TinyBackend":
        cfg = dict(spec["config"])
        for key in ("block_out_channels", "attention_levels"):
            cfg[key] = tuple(cfg[key])
        return cls(spec["prompts"], TinyConfig(**cfg))

    def calibrate(self, pixels: torch.Tensor) -> None:
        if self.config.latent_scale > 0:
            return
        std = float(F.pixel_unshuffle(pixels.float(), self.latent_factor).std())
        self.config.latent_scale = round(1.0 / max(std, 1e-3), 4)
        self.spec["config"]["latent_scale"] = self.config.latent_scale

    def _scale(self) -> float:
        # a model that never saw data (an untrained reference) has nothing to calibrate on
        return self.config.latent_scale if self.config.latent_scale > 0 else 1.0

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(pixels.to(self.device), self.latent_factor) * self._scale()

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latents / self._scale(), self.latent_factor)

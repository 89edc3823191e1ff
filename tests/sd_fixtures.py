"""Random-weight Stable Diffusion folders, laid out like a hub SD repository, built offline.

``build_sd_folder(folder, "tiny")`` writes a pipeline small enough for CPU tests (latent factor 2,
cross-attention dim 32); ``"sd15"`` writes the real SD 1.5 architecture (UNet 320/640/1280/1280,
VAE with 4 levels, CLIP ViT-L/14 text encoder) with random weights, for GPU timing
(``scripts/gpu_check.py``). Both use a tiny character-level CLIP tokenizer written here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,'!?{}_-:;()"


def write_tokenizer(folder: Path, max_length: int = 77) -> None:
    """A character-level CLIP BPE vocabulary (no merges), saved as a CLIPTokenizer."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    raw = folder / "raw"
    raw.mkdir(exist_ok=True)
    (raw / "vocab.json").write_text(json.dumps(vocab))
    (raw / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(raw / "vocab.json"), str(raw / "merges.txt"), model_max_length=max_length)
    tokenizer.save_pretrained(str(folder))
    for f in raw.iterdir():
        f.unlink()
    raw.rmdir()


ARCHS = {
    "tiny": dict(
        unet=dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  cross_attention_dim=32, attention_head_dim=4, norm_num_groups=16),
        vae=dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1,
                 norm_num_groups=16, sample_size=32),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=77, vocab_size=1000, projection_dim=32,
                  bos_token_id=0, eos_token_id=1, pad_token_id=1),
    ),
    # the real Stable Diffusion 1.5 configuration (stable-diffusion-v1-5/stable-diffusion-v1-5)
    "sd15": dict(
        unet=dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=(320, 640, 1280, 1280),
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                  cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32),
        vae=dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                 norm_num_groups=32, sample_size=512),
        # CLIP ViT-L/14 text tower
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  max_position_embeddings=77, vocab_size=49408, projection_dim=768, hidden_act="quick_gelu"),
    ),
}


def build_sd_folder(folder: str | Path, arch: str = "tiny", seed: int = 0, scheduler: str = "pndm") -> Path:
    """Write ``folder/{unet,vae,text_encoder,tokenizer,scheduler}`` with random weights."""
    from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    spec = ARCHS[arch]
    torch.manual_seed(seed)
    UNet2DConditionModel(**spec["unet"]).save_pretrained(str(folder / "unet"))
    AutoencoderKL(**spec["vae"]).save_pretrained(str(folder / "vae"))
    CLIPTextModel(CLIPTextConfig(**spec["text"])).save_pretrained(str(folder / "text_encoder"))
    write_tokenizer(folder / "tokenizer")
    # SD 1.5 ships a PNDM config; the backend reads it as a DDPMScheduler
    cls = PNDMScheduler if scheduler == "pndm" else DDPMScheduler
    extra = {"skip_prk_steps": True} if scheduler == "pndm" else {}
    cls(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        **extra).save_pretrained(str(folder / "scheduler"))
    return folder

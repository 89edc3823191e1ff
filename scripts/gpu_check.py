#!/usr/bin/env python
"""Throughput and memory of the Stable Diffusion backend: a short finetune and typicality.

    # real weights (a folder laid out like a hub SD repo, or a hub id when online)
    python scripts/gpu_check.py --model sd:/models/stable-diffusion-v1-5
    # no weights at hand: random weights in the real SD 1.5 architecture, built locally
    python scripts/gpu_check.py --build-sd15-random
    # CPU smoke check of this script (tiny architecture, 32 px)
    python scripts/gpu_check.py --tiny

Prints training images/s (forward + backward + AdamW step, the same computation as
``diffmine train``), typicality images/s at K draws (``typicality_latent_maps``, as
``diffmine typicality``), the peak GPU memory of each (``torch.cuda.max_memory_allocated``), and
the UNet's achieved FLOP/s in typicality against the device's matmul peak in the same precision.
With ``--pipeline`` it also runs the real steps (train, typicality, mine) on a temporary run.
Images: ``--data DIR`` (``<label>/<image>`` folders) or the built-in synthetic dataset.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # sd_fixtures: the random-weight SD folders


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="sd:PATH_OR_HUB_ID")
    src.add_argument("--build-sd15-random", action="store_true", help="random weights, real SD 1.5 architecture")
    src.add_argument("--tiny", action="store_true", help="tiny random SD, 32 px, few steps: a CPU smoke check")
    p.add_argument("--build-dir", type=Path, default=None, help="where to build the random pipeline (default: a temp dir)")
    p.add_argument("--data", type=Path, default=None, help="image folder <label>/<image> (default: synthetic)")
    p.add_argument("--resolution", type=int, default=None, help="image side (default: 512; 32 with --tiny)")
    p.add_argument("--images", type=int, default=None, help="images used (default: 64; 8 with --tiny)")
    p.add_argument("--batch-size", type=int, default=None, help="training images per step (default: 8; 2 with --tiny)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (default: 10; 2 with --tiny)")
    p.add_argument("--samples", type=int, default=None, help="K draws per image for typicality (default: 16; 2 with --tiny)")
    p.add_argument("--typicality-batch", type=int, default=64, help="UNet inputs per forward pass in typicality")
    p.add_argument("--mixed-precision", default=None, choices=["no", "bf16", "fp16"], help="training autocast (default: bf16 on GPU)")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"], help="typicality autocast (default: bf16 on GPU)")
    p.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank instead of the full UNet")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--pipeline", action="store_true", help="also run the real train / typicality / mine steps on a temp run")
    p.add_argument("--device", default=None, help="default: cuda when available")
    args = p.parse_args(argv)
    tiny = args.tiny
    defaults = dict(resolution=32 if tiny else 512, images=8 if tiny else 64, batch_size=2 if tiny else 8,
                    steps=2 if tiny else 10, samples=2 if tiny else 16)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not (args.model or args.build_sd15_random or tiny):
        p.error("give --model sd:PATH, --build-sd15-random or --tiny")
    return args


def load_pixels(args, workdir: Path):
    """(N, 3, H, W) in [-1, 1], labels, the image folder."""
    import numpy as np

    from diffmine.data import load_image, scan_dataset, to_model_input
    from diffmine.synthetic import SynthConfig, generate

    folder = args.data
    if folder is None:
        per_label = max(1, -(-args.images // 2))
        folder = generate(workdir / "synth", SynthConfig(labels=2, per_label=per_label, size=args.resolution), progress=False)
    dataset = scan_dataset(folder)
    table = dataset.table().to_pandas().head(args.images)
    arrays = [load_image(p, args.resolution, "square", 8) for p in table["path"]]
    return to_model_input(np.stack(arrays)), table["label"].tolist(), folder


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def time_training(backend, pixels, labels, args, device) -> dict:
    """The computation of one ``diffmine train`` step, timed over ``args.steps`` steps after 2 warm-up steps."""
    import torch

    prompts_of = {l: f"An image of {l}." for l in set(labels)}
    params = [p for p in backend.denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=backend.default_learning_rate, weight_decay=1e-2)
    if args.gradient_checkpointing:
        backend.unet.enable_gradient_checkpointing()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    scaler = torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16")
    alphas = backend.scheduler.alphas_cumprod.to(device)
    T = backend.scheduler.config.num_train_timesteps
    backend.denoiser.train()
    g = torch.Generator().manual_seed(0)
    reset_peak(device)

    def step(i):
        idx = torch.randint(0, len(pixels), (args.batch_size,), generator=g)
        with torch.no_grad():
            latents = backend.encode_images(pixels[idx].to(device)).float()
        noise = torch.randn(latents.shape, generator=g).to(device)
        t = torch.randint(0, T, (len(idx),), generator=g).to(device)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        prompts = [prompts_of[labels[j]] if torch.rand(1, generator=g) > 0.1 else "An image." for j in idx.tolist()]
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            pred = backend.denoiser(noisy, t, prompts)
        loss = (pred.float() - noise).pow(2).mean()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach().item()

    for i in range(2):
        step(i)
    sync(device)
    start = time.perf_counter()
    for i in range(args.steps):
        loss = step(i)
    sync(device)
    seconds = time.perf_counter() - start
    del optimizer
    return {"train_images_per_s": args.steps * args.batch_size / seconds, "train_step_s": seconds / args.steps,
            "train_peak_gib": peak_gib(device), "train_loss": loss}


def time_typicality(backend, pixels, labels, args, device) -> dict:
    import torch

    from diffmine.typicality import TypicalityConfig, typicality_latent_maps

    config = TypicalityConfig(samples=args.samples, batch_size=args.typicality_batch, precision=args.precision)
    per_batch = max(1, config.batch_size // (2 * config.samples))  # images per call, as the typicality step does
    backend.denoiser.eval()
    prompts = [f"An image of {l}." for l in labels]
    typicality_latent_maps(backend, pixels[:per_batch], prompts[:per_batch], "An image.", config)  # warm-up
    reset_peak(device)
    sync(device)
    start = time.perf_counter()
    done = 0
    for i in range(0, len(pixels), per_batch):
        maps = typicality_latent_maps(backend, pixels[i:i + per_batch], prompts[i:i + per_batch], "An image.", config)
        done += len(maps)
    sync(device)
    seconds = time.perf_counter() - start
    return {"typicality_images_per_s": done / seconds, "typicality_samples": args.samples,
            "typicality_images_per_call": per_batch, "typicality_peak_gib": peak_gib(device),
            "typicality_map_shape": list(maps.shape[1:]), "typicality_finite": bool(torch.isfinite(maps).all())}


def unet_share_of_peak(backend, args, device, images_per_s: float) -> dict:
    """Achieved FLOP/s of the UNet forward during typicality (FLOPs counted by
    torch.utils.flop_counter) against a large square matmul in the same precision, on this device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from diffmine.typicality import autocast

    latent = backend.encode_images(torch.zeros(1, 3, args.resolution, args.resolution, device=device))
    states = backend.encode_prompts(["An image."])
    with torch.inference_mode(), autocast(device, args.precision), FlopCounterMode(display=False) as counter:
        backend.denoiser(latent, torch.full((1,), 500, device=device), states)
    per_input = counter.get_total_flops()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision, torch.float32)
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(6):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    peak = 2 * n ** 3 / best
    achieved = per_input * 2 * args.samples * images_per_s
    return {"unet_gflop_per_input": per_input / 1e9, "matmul_peak_tflops": peak / 1e12,
            "typicality_unet_tflops": achieved / 1e12, "typicality_share_of_peak": achieved / peak}


def run_pipeline(model: str, folder: Path, args, workdir: Path) -> dict:
    from diffmine.mining import MineConfig
    from diffmine.pipeline import mine_step, prepare, train_step, typicality_step
    from diffmine.rundir import Run
    from diffmine.train import TrainConfig
    from diffmine.typicality import TypicalityConfig

    run = Run(workdir / "run")
    prepare(run, folder, "An image of {label}.", "An image.", args.resolution, model=model)
    options = {"lora_rank": args.lora_rank} if args.lora_rank else {}
    start = time.perf_counter()
    train_step(run, TrainConfig(steps=2, batch_size=args.batch_size, checkpoint_every=1000, keep_checkpoints=1,
                                mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing),
               model_options=options, progress=False)
    trained = time.perf_counter() - start
    start = time.perf_counter()
    typicality_step(run, TypicalityConfig(samples=args.samples, batch_size=args.typicality_batch, precision=args.precision),
                    progress=False)
    scored = time.perf_counter() - start
    mined = mine_step(run, MineConfig(), progress=False)
    return {"pipeline_train_2_steps_s": trained, "pipeline_typicality_s": scored,
            "pipeline_patches": int(len(run.patches("top"))), "pipeline_run": str(run.path)}


def main(argv=None) -> int:
    args = parse(argv)
    if args.tiny or args.build_sd15_random:  # everything is local
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from diffmine.models import create_backend

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.mixed_precision is None:
        args.mixed_precision = "bf16" if device.type == "cuda" else "no"
    if args.precision is None:
        args.precision = "bf16" if device.type == "cuda" else "fp32"
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        workdir = Path(tmp)
        result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  "torch": torch.__version__}
        if args.model:
            model = args.model
        else:
            from sd_fixtures import build_sd_folder

            arch = "tiny" if args.tiny else "sd15"
            folder = args.build_dir or workdir / f"random-{arch}"
            start = time.perf_counter()
            if not (folder / "unet").is_dir():
                build_sd_folder(folder, arch)
            result["build_s"] = time.perf_counter() - start
            model = f"sd:{folder}"
        result["model"] = model
        options = {"lora_rank": args.lora_rank} if args.lora_rank else {}
        start = time.perf_counter()
        backend = create_backend(model, [], **options).to(device)
        result["load_s"] = time.perf_counter() - start
        result["unet_params_m"] = sum(p.numel() for p in backend.unet.parameters()) / 1e6
        result["trainable_params_m"] = sum(p.numel() for p in backend.trainable_state().values()) / 1e6
        pixels, labels, data = load_pixels(args, workdir)
        result.update(resolution=args.resolution, images=len(pixels), batch_size=args.batch_size,
                      mixed_precision=args.mixed_precision, precision=args.precision, lora_rank=args.lora_rank)
        result.update(time_training(backend, pixels, labels, args, device))
        result.update(time_typicality(backend, pixels, labels, args, device))
        result.update(unet_share_of_peak(backend, args, device, result["typicality_images_per_s"]))
        del backend
        if args.pipeline:
            result.update(run_pipeline(model, data, args, workdir))
    print(f"device: {result['device']}  model: {result['model']}  resolution: {result['resolution']}  "
          f"UNet {result['unet_params_m']:.1f}M params ({result['trainable_params_m']:.2f}M trained)")
    mem = lambda v: "n/a (cpu)" if v is None else f"{v:.2f} GiB"  # noqa: E731
    print(f"training:   {result['train_images_per_s']:.2f} images/s (batch {args.batch_size}, {args.mixed_precision}), "
          f"peak GPU memory {mem(result['train_peak_gib'])}")
    print(f"typicality: {result['typicality_images_per_s']:.2f} images/s at K={args.samples} ({args.precision}), "
          f"peak GPU memory {mem(result['typicality_peak_gib'])}")
    print(f"UNet:       {result['unet_gflop_per_input']:.1f} GFLOP per input; typicality runs it at "
          f"{result['typicality_unet_tflops']:.3f} TFLOP/s = {100 * result['typicality_share_of_peak']:.0f}% of this "
          f"device's {args.precision} matmul peak ({result['matmul_peak_tflops']:.3f} TFLOP/s)")
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

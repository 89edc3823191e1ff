"""Throughput of the embedded model: typicality and training, against baselines of the same run.

    .venv/bin/python benchmarks/throughput.py [--images 64] [--samples 16] [--threads N]

Prints one table:
- typicality, naive reference: one image, one draw, one condition per UNet pass;
- typicality, diffmine: draws x conditions x images batched (``condition_errors``);
- the same in bf16 autocast (emulated on CPUs without AVX-512 BF16);
- training steps (batch 32);
each with images/s, the speed-up over the naive reference, and the achieved FLOP/s of the UNet
(counted with torch.utils.flop_counter) as a share of this machine's fp32 matmul peak, measured
in the same run.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffmine.models.tiny import TinyBackend
from diffmine.typicality import condition_errors, draw_noise


def matmul_peak(n: int = 2048, repeat: int = 10) -> float:
    """Best fp32 FLOP/s of a square matmul on this machine."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def unet_flops(backend, batch: int, latent_shape, train: bool = False) -> int:
    x = torch.randn(batch, *latent_shape)
    states = backend.encode_prompts([backend.denoiser.prompt_encoder.prompts[0]] * batch).detach()
    with FlopCounterMode(display=False) as counter:
        if train:
            backend.unet(x, torch.full((batch,), 500), states).sample.pow(2).mean().backward()
        else:
            with torch.no_grad():
                backend.unet(x, torch.full((batch,), 500), states)
    return counter.get_total_flops()


def timed(fn, repeat: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    backend = TinyBackend(["A scene from a.", "A scene from b.", "A scene."])
    backend.denoiser.eval()
    f = backend.latent_factor
    latent_shape = (3 * f * f, args.resolution // f, args.resolution // f)
    latents = torch.randn(args.images, *latent_shape)
    states = torch.stack([backend.encode_prompts(["A scene from a."] * args.images),
                          backend.encode_prompts(["A scene."] * args.images)], 1).detach()
    timesteps, noise = draw_noise(0, args.samples, latent_shape, 1000)
    peak = matmul_peak()
    per_input = unet_flops(backend, 64, latent_shape) / 64
    passes = args.images * args.samples * 2
    rows = []

    naive_images = max(1, args.images // 8)  # the naive path is slow: time a few images, scale per image

    def naive():
        with torch.inference_mode():
            for b in range(naive_images):
                for k in range(args.samples):
                    for m in range(2):
                        condition_errors(backend, latents[b:b + 1], states[b:b + 1, m:m + 1], timesteps[k:k + 1],
                                         noise[k:k + 1], batch_size=1)

    seconds = timed(naive, 1) / naive_images * args.images
    rows.append(("typicality naive (1 img, 1 draw, 1 cond / pass)", seconds))
    for precision in ("fp32", "bf16"):
        seconds = timed(lambda: condition_errors(backend, latents, states, timesteps, noise, 256, precision))
        rows.append((f"typicality batched, {precision}", seconds))
    base = rows[0][1]
    print(f"fp32 matmul peak measured: {peak / 1e9:.1f} GFLOP/s; UNet forward {per_input / 1e6:.1f} MFLOP per input; "
          f"K = {args.samples}, {args.images} images of {args.resolution}px, {torch.get_num_threads()} threads\n")
    print(f"{'path':<50} {'img/s':>8} {'ms/img':>8} {'speed-up':>9} {'GFLOP/s':>8} {'% peak':>7}")
    for name, seconds in rows:
        flops = per_input * passes / seconds
        print(f"{name:<50} {args.images / seconds:>8.2f} {1000 * seconds / args.images:>8.1f} {base / seconds:>8.1f}x "
              f"{flops / 1e9:>8.1f} {100 * flops / peak:>6.1f}%")

    # training: forward + backward + AdamW step at batch 32
    backend.denoiser.train()
    optimizer = torch.optim.AdamW(backend.denoiser.parameters(), lr=1e-4)
    batch = 32
    x = torch.randn(batch, *latent_shape)
    prompts = ["A scene from a."] * batch
    train_flops = unet_flops(backend, batch, latent_shape, train=True)

    def step(autocast=False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            pred = backend.denoiser(x, torch.randint(0, 1000, (batch,)), prompts)
        pred.float().sub(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    for name, autocast in (("training step fp32 (batch 32)", False), ("training step bf16 autocast", True)):
        seconds = timed(lambda: step(autocast))
        print(f"{name:<50} {batch / seconds:>8.1f} {1000 * seconds / batch:>8.1f} {'':>9} "
              f"{train_flops / seconds / 1e9:>8.1f} {100 * train_flops / seconds / peak:>6.1f}%")


if __name__ == "__main__":
    main()

"""Throughput of the embedded model: typicality and training, against baselines of the same run.

    .venv/bin/python benchmarks/throughput.py [--images 32] [--samples 16] [--rounds 5] [--bf16] [--compile]

Prints one table:
- typicality, naive reference: one image, one draw, one condition per UNet pass;
- typicality, diffmine: draws x conditions x images batched (``condition_errors``) at several
  UNet inputs per pass (the default, ``backend.inputs_per_pass``, is marked), and channels-last;
- optionally bf16 autocast (native with AMX / AVX-512 BF16, emulated and slow elsewhere: then
  timed on 1/8 of the images) and ``torch.compile``;
- training steps (batch 32);
each with images/s, the speed-up over the naive reference, and the achieved FLOP/s of the UNet
(counted with torch.utils.flop_counter) as a share of this machine's matmul peak in the path's
own precision (a bf16 matmul peak for the bf16 rows).

Shared machines drift (a VM's neighbours, clock changes): every timing is taken right after a
fresh measurement of the matmul peak, each round goes through every path in turn, and the table
gives the median over rounds of the img/s and of the per-round share of the peak.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from diffmine.machine import native_bf16
from diffmine.models.tiny import TinyBackend
from diffmine.typicality import condition_errors, draw_noise


def best_seconds(fn, repeat: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_peak(a: torch.Tensor, b: torch.Tensor, repeat: int = 5) -> float:
    """Best FLOP/s of a square matmul in ``a``'s dtype on this machine, now."""
    return 2 * a.shape[0] ** 3 / best_seconds(lambda: a @ b, repeat)


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--passes", type=int, nargs="+", default=[32, 64, 128, 256], help="UNet inputs per pass to try")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--bf16", action="store_true", help="also bf16 autocast (slow where emulated)")
    parser.add_argument("--compile", action="store_true", help="also torch.compile (inductor; compiles for minutes)")
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
    per_input = unet_flops(backend, 64, latent_shape) / 64
    default_pass = backend.inputs_per_pass
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a16, b16 = a.bfloat16(), b.bfloat16()

    def typicality(images: int, inputs_per_pass: int, precision: str = "fp32", model=None):
        def fn():
            condition_errors(model or backend, latents[:images], states[:images], timesteps, noise, inputs_per_pass,
                             precision)
        return fn

    naive_images = max(1, args.images // 8)  # the naive path is slow: time a few images, scale per image

    def naive():
        with torch.inference_mode():
            for i in range(naive_images):
                for k in range(args.samples):
                    for m in range(2):
                        condition_errors(backend, latents[i:i + 1], states[i:i + 1, m:m + 1], timesteps[k:k + 1],
                                         noise[k:k + 1], batch_size=1)

    # (name, fn, images per call, UNet FLOPs per call, repeats)
    typicality_flops = per_input * args.samples * 2
    paths = [("typicality naive (1 img, 1 draw, 1 cond / pass)", naive, naive_images, typicality_flops * naive_images, 1)]
    for inputs in args.passes:
        mark = " (default)" if inputs == default_pass else ""
        paths.append((f"typicality batched fp32, {inputs} inputs/pass{mark}", typicality(args.images, inputs),
                      args.images, typicality_flops * args.images, 2))
    channels_last = TinyBackend(["A scene from a.", "A scene from b.", "A scene."])
    channels_last.denoiser.load_state_dict(backend.denoiser.state_dict())
    channels_last.denoiser.eval().to(memory_format=torch.channels_last)
    paths.append((f"typicality channels-last, {default_pass} inputs/pass", typicality(args.images, default_pass, model=channels_last),
                  args.images, typicality_flops * args.images, 2))
    if args.bf16:
        few = args.images if native_bf16("cpu") else max(1, args.images // 8)
        paths.append((f"typicality bf16 autocast, {default_pass} inputs/pass", typicality(few, default_pass, "bf16"),
                      few, typicality_flops * few, 1))
    if args.compile:
        compiled = TinyBackend(["A scene from a.", "A scene from b.", "A scene."])
        compiled.denoiser.load_state_dict(backend.denoiser.state_dict())
        compiled.denoiser.eval()
        compiled.denoiser.unet = torch.compile(compiled.denoiser.unet, dynamic=False)
        t0 = time.perf_counter()
        typicality(args.images, default_pass, model=compiled)()
        print(f"torch.compile: {time.perf_counter() - t0:.0f} s to compile (not in the table)")
        paths.append((f"typicality torch.compile, {default_pass} inputs/pass", typicality(args.images, default_pass, model=compiled),
                      args.images, typicality_flops * args.images, 2))

    # training: forward + backward + AdamW step at batch 32
    trainer = TinyBackend(["A scene from a.", "A scene from b.", "A scene."])
    trainer.denoiser.train()
    optimizer = torch.optim.AdamW(trainer.denoiser.parameters(), lr=1e-4)
    batch = 32
    x = torch.randn(batch, *latent_shape)
    prompts = ["A scene from a."] * batch
    train_flops = unet_flops(trainer, batch, latent_shape, train=True)

    def step(autocast: bool):
        def fn():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                pred = trainer.denoiser(x, torch.randint(0, 1000, (batch,)), prompts)
            pred.float().sub(x).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        return fn

    paths.append((f"training step fp32 (batch {batch})", step(False), batch, train_flops, 3))
    if args.bf16:
        paths.append(("training step bf16 autocast", step(True), batch, train_flops, 1))

    seconds = {name: [] for name, *_ in paths}
    shares = {name: [] for name, *_ in paths}
    peaks = {"fp32": [], "bf16": []}
    for _ in range(args.rounds):
        for name, fn, images, flops, repeat in paths:
            dtype = "bf16" if "bf16" in name else "fp32"
            peak = matmul_peak(a16, b16) if dtype == "bf16" else matmul_peak(a, b)
            peaks[dtype].append(peak)
            s = best_seconds(fn, repeat)
            seconds[name].append(s / images)
            shares[name].append(flops / s / peak)

    naive_s = np.median(seconds[paths[0][0]])
    for dtype, measured in peaks.items():
        if measured:
            print(f"{dtype} matmul peak (2048^2) over the run: median {np.median(measured) / 1e9:.1f}, range "
                  f"{min(measured) / 1e9:.1f}-{max(measured) / 1e9:.1f} GFLOP/s")
    print(f"native bf16 on this CPU: {native_bf16('cpu')}; UNet forward {per_input / 1e6:.1f} MFLOP per input; K = {args.samples}, "
          f"{args.images} images of {args.resolution}px, {torch.get_num_threads()} threads, median of {args.rounds} rounds\n")
    print(f"| {'path':<52} | {'img/s':>7} | {'ms/img':>7} | {'speed-up':>8} | {'GFLOP/s':>7} | {'% of peak':>9} |")
    print(f"|{'-' * 54}|{'-' * 9}|{'-' * 9}|{'-' * 10}|{'-' * 9}|{'-' * 11}|")
    for name, fn, images, flops, repeat in paths:
        s = float(np.median(seconds[name]))
        speedup = f"{naive_s / s:.1f}x" if name.startswith("typicality") else ""
        print(f"| {name:<52} | {1 / s:>7.2f} | {1000 * s:>7.1f} | {speedup:>8} | {flops / images / s / 1e9:>7.1f} | "
              f"{100 * np.median(shares[name]):>8.1f}% |")


if __name__ == "__main__":
    main()

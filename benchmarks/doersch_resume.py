"""What an interrupted `diffmine baseline doersch` costs to finish: a full run against one stopped
by SIGINT (Ctrl-C) as soon as --stop-after labels are mined (their parts written), then run again,
on the built-in synthetic dataset. Prints both runs' seconds per phase (from settings.json) and
whether the resumed patches.parquet is byte for byte the full run's.

    python benchmarks/doersch_resume.py                          # 120 images of 64 px listed at 256 px, preset data
    python benchmarks/doersch_resume.py --per-label 24 --size 48 --resolution 48 --config '{"patch": 16, "stride": 4}'
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

from diffmine.baselines.doersch import PARTS, DoerschConfig, output_dir, run_doersch
from diffmine.pipeline import prepare
from diffmine.rundir import Run
from diffmine.synthetic import SynthConfig, generate


def interrupted(run: Run, config: DoerschConfig, labels: int) -> float:
    """Seconds until a run, in a child process, has ``labels`` parts written and is sent SIGINT."""
    t0 = time.perf_counter()
    child = mp.get_context("spawn").Process(target=run_doersch, args=(run, config), kwargs={"progress": False})
    child.start()
    while len(list((output_dir(run) / PARTS).glob("*.parquet"))) < labels:
        if not child.is_alive():
            raise SystemExit(f"the run ended before {labels} labels were mined")
        time.sleep(0.2)
    os.kill(child.pid, signal.SIGINT)
    child.join()
    return time.perf_counter() - t0


def timed(run: Run, config: DoerschConfig) -> tuple[float, dict]:
    t0 = time.perf_counter()
    run_doersch(run, config, progress=False)
    return time.perf_counter() - t0, json.loads((output_dir(run) / "settings.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("doersch-resume-bench"))
    parser.add_argument("--labels", type=int, default=4)
    parser.add_argument("--per-label", type=int, default=30)
    parser.add_argument("--size", type=int, default=64, help="side of the generated images")
    parser.add_argument("--resolution", type=int, default=256, help="side they are listed at")
    parser.add_argument("--stop-after", type=int, default=3, help="labels mined before the first run is stopped")
    parser.add_argument("--config", default="{}", help="DoerschConfig fields as JSON (default: the defaults)")
    args = parser.parse_args()
    config = DoerschConfig(**json.loads(args.config))
    images = generate(args.out / "synth", SynthConfig(labels=args.labels, per_label=args.per_label, size=args.size),
                      progress=False)
    full, stopped = Run(args.out / "full"), Run(args.out / "stopped")
    for run in (full, stopped):
        prepare(run, images, "A scene from {label}.", "A scene.", args.resolution)
    full_s, full_settings = timed(full, config)

    stopped_s = interrupted(stopped, config, args.stop_after)
    resumed_s, resumed_settings = timed(stopped, config)
    same = (output_dir(full) / "patches.parquet").read_bytes() == (output_dir(stopped) / "patches.parquet").read_bytes()
    print(json.dumps({"images": full_settings["images"], "patches": full_settings["patches"],
                      "full_s": round(full_s, 1), "full_phases": full_settings["seconds"],
                      "stopped_s": round(stopped_s, 1), "resumed_s": round(resumed_s, 1),
                      "resumed_phases": resumed_settings["seconds"], "labels_reused": resumed_settings["resumed"],
                      "bytes_identical": same}, indent=1))


if __name__ == "__main__":
    main()

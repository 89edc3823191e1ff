"""``diffmine status``: what a run has done, what is left, which files were bad."""

from __future__ import annotations

import math

from .train import latest_checkpoint
from .shards import shard_is_complete


def status(run) -> str:
    lines = [f"run: {run.path}"]
    config = run.config
    if "dataset" not in config:
        return "\n".join(lines + ["nothing yet: start with `diffmine train --data DIR --run RUN`"])
    dataset = config["dataset"]
    lines.append(f"dataset: {dataset['images']} images, labels {', '.join(dataset['labels'])} ({dataset['data']})")
    if (run.model_dir / "trainable.safetensors").is_file():
        lines.append(f"train: done ({config.get('train', {}).get('steps', '?')} steps)")
    else:
        checkpoint = latest_checkpoint(run.model_dir)
        lines.append(f"train: {'resumable at ' + checkpoint.name if checkpoint else 'not started'}")
    settings = config.get("typicality")
    shards = run.typicality_shards()
    if settings or shards:
        shard_size = (settings or {}).get("shard_size", 512)
        total = math.ceil(dataset["images"] / shard_size)
        done = sum(shard_is_complete(run.typicality_dir, s.stem) for s in shards)
        lines.append(f"typicality: {done}/{total} shards complete ({total - done} left)")
    for step, path in (("mine", run.patches_path), ("cluster", run.clusters_path), ("report", run.report_path)):
        lines.append(f"{step}: {'done' if path.is_file() else 'not run'}")
    parts = sorted(run.features_path.parent.glob("part-*-of-*.npz"))
    if parts and not run.clusters_path.is_file():  # a data-parallel cluster step running, or killed
        world = int(parts[0].stem.rsplit("-", 1)[1])
        lines.append(f"cluster features: {len(parts)}/{world} processes' parts written, not yet gathered")
    problems = run.problems()
    lines.append(f"bad or skipped images: {len(problems)}")
    lines += [f"  {p.path or p.image_id} ({p.step}): {p.problem}" for p in problems.head(20).itertuples()]
    if len(problems) > 20:
        lines.append(f"  ... {len(problems) - 20} more: diffmine query --run {run.path} \"SELECT * FROM problems\"")
    return "\n".join(lines)

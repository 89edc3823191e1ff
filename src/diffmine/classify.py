"""Typicality as a classifier: did the finetuned model learn the labels?

Each image is scored under every label with the shared draws of typicality (one forward pass
holds all labels and the null prompt of a draw); its image-level typicality under label c is the
mean over pixels of L(null) - L(c), and the prediction is the label that explains it best. With
shared noise, argmax_c T(x|c) = argmin_c L(x, c): the rule of Diffusion Classifier (Li et al.,
ICCV 2023), here with typicality's stratified, antithetic draws instead of an evenly spaced grid.

    diffmine classify --run RUN [--per-label N] [--samples K] [--json]

With a held-out split (``--holdout`` at listing), the held-out images are scored and reported
first, the training images beside them: a model can know its training images without knowing
the labels. Writes RUN/classify/scores.parquet (image_id, label, split, candidate, typicality: one
row per image and candidate label) and RUN/classify/summary.json (accuracy, per-label recall,
confusion matrix, the split they are of, and ``splits``: the same per split).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from tqdm import tqdm

from .atomic import write_json, write_table
from .data import BadImage, Problem, image_batches, listed_of, to_model_input
from .models import Backend
from .terminal import printable
from .typicality import DEFAULT_SAMPLES, TypicalityConfig, compiled, prompt_errors


# typicality's fields that classify's command has no flag for: it stores no maps
NO_FLAGS = ("shard_size", "map_dtype", "unit_maps")


@dataclass
class ClassifyConfig(TypicalityConfig):
    """How typicality draws (its fields, with its defaults: not the run's typicality settings) plus
    the choice of images to score."""

    samples: int = DEFAULT_SAMPLES  # no adaptive estimator here: K is the draws of every image
    per_label: int = 50  # images scored per label (0: all), drawn at random with the seed

    def __post_init__(self):
        super().__post_init__()
        if self.per_label < 0:
            raise ValueError(f"per_label must be >= 0 (0: all), got {self.per_label}")
        if self.estimator == "adaptive":
            raise ValueError("classify has no adaptive estimator (it targets typicality's mining); use stratified-antithetic")


def label_scores(backend: Backend, pixels: torch.Tensor, label_prompts: list[str], null_prompt: str,
                 config: TypicalityConfig) -> np.ndarray:
    """Image-level typicality of each image under each label.

    Args:
        pixels: (B, 3, H, W) in [-1, 1]
        label_prompts: the M candidate prompts, the same for every image
    Returns:
        (B, M) float64: mean over latent pixels of L(null) - L(label)
    """
    errors = prompt_errors(backend, pixels, [label_prompts + [null_prompt]] * len(pixels), config)
    per_image = errors.mean((-2, -1)).double().cpu().numpy()  # (B, M + 1)
    return per_image[:, -1:] - per_image[:, :-1]


def sample_images(images: pd.DataFrame, per_label: int, seed: int) -> pd.DataFrame:
    """Up to ``per_label`` images of each label, a seeded random choice, in listing order."""
    if per_label <= 0:
        return images
    rng = np.random.default_rng(seed)
    keep = []
    for _, group in images.groupby("label", sort=True):
        keep.extend(rng.choice(group.index.to_numpy(), size=min(per_label, len(group)), replace=False))
    return images.loc[sorted(keep)]


def summarize(scores: pd.DataFrame, labels: list[str]) -> dict:
    """Accuracy, per-label recall and the confusion matrix (rows: true label, columns: predicted)."""
    wide = scores.pivot(index="image_id", columns="candidate", values="typicality")[labels]
    truth = scores.drop_duplicates("image_id").set_index("image_id").loc[wide.index, "label"]
    predicted = wide.idxmax(axis=1)
    confusion = pd.crosstab(truth, predicted).reindex(index=labels, columns=labels, fill_value=0)
    recall = {label: float((predicted[truth == label] == label).mean()) for label in labels if (truth == label).any()}
    return {
        "images": int(len(wide)),
        "accuracy": float((predicted == truth).mean()),
        "chance": 1.0 / len(labels),
        "per_label": recall,
        "labels": labels,
        "confusion": confusion.to_numpy().tolist(),
    }


def report_splits(images: pd.DataFrame) -> list[str]:
    """The splits an evaluation reports, the one it leads with first: held-out when there is one."""
    return ["holdout", "train"] if (images["split"] == "holdout").any() else ["train"]


def run_classify(run, backend: Backend, config: ClassifyConfig, progress: bool = True) -> dict:
    """Score the chosen images under every label; write the tables; return the summary."""
    dataset = run.step_config("dataset")
    labels = dataset["labels"]
    prompts = [run.prompt(label) for label in labels]
    listing = run.as_trained(run.images())  # held out: never trained on, whatever the listing says now
    splits = report_splits(listing)
    images = pd.concat([sample_images(listing[listing["split"] == s], config.per_label, config.seed) for s in splits])
    images = images.sort_index()
    records = images.to_dict("records")
    backend.denoiser.eval()
    rows, skipped = [], []
    # every image costs (M + 1) * K UNet inputs; batch images so a pass holds about batch_size
    per_batch = max(1, (config.batch_size or backend.inputs_per_pass) // ((len(labels) + 1) * config.samples))
    bar = tqdm(total=len(records), desc="classify", unit="img", disable=not progress)
    batches = image_batches([r["path"] for r in records], dataset["resolution"], dataset["resize"],
                            backend.latent_factor, per_batch, config.workers, listed_of(images))
    with compiled(backend, config.compile):
        for positions, batch in batches:
            if isinstance(batch, BadImage):
                skipped.append(Problem(records[positions[0]]["image_id"], batch.path, batch.problem))
            else:
                scores = label_scores(backend, to_model_input(batch), prompts, run.prompt(None), config)
                for i, row in zip(positions, scores):
                    rows.extend(dict(image_id=records[i]["image_id"], label=records[i]["label"],
                                     split=records[i]["split"], candidate=c, typicality=float(s))
                                for c, s in zip(labels, row))
            bar.update(len(positions))
    bar.close()
    # one line each, recorded as problems of step classify (this result's only: fixed ones go)
    run.report_skipped("classify", skipped)
    if not rows:
        raise ValueError(f"{run.path}: no readable images to classify")
    scores = pd.DataFrame(rows)
    out = run.path / "classify"
    write_table(pa.Table.from_pandas(scores, preserve_index=False), out / "scores.parquet")
    per_split = {s: summarize(scores[scores["split"] == s], labels) for s in splits if (scores["split"] == s).any()}
    lead = next(iter(per_split))
    summary = {"split": lead, **per_split[lead], "splits": per_split}
    write_json(out / "summary.json", {**summary, "settings": asdict(config)})
    return summary


def format_summary(summary: dict) -> str:
    labels = [printable(label) for label in summary["labels"]]  # a newline in a label would forge a row
    width = max(8, *(len(label) for label in labels))
    lines = [f"{split} split: accuracy {s['accuracy']:.3f} over {s['images']} images (chance {s['chance']:.3f})"
             for split, s in summary.get("splits", {summary.get("split", "train"): summary}).items()]
    lines += ["", f"{summary.get('split', 'train')} split, confusion (rows: true label, columns: predicted)",
             " " * (width + 1) + " ".join(f"{label[:width]:>{width}}" for label in labels)]
    for label, counts in zip(labels, summary["confusion"]):
        lines.append(f"{label:<{width}} " + " ".join(f"{c:>{width}}" for c in counts))
    return "\n".join(lines)

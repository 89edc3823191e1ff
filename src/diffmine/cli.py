"""Command line: ``diffmine <step> --run RUN ...``; each step reads and writes the run directory.

Options are generated from the steps' config dataclasses, so a flag and its default live in one
place; ``diffmine run`` takes every step's flags.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from .adaptive import AdaptiveConfig
from .baselines.doersch import add_parser as add_baseline
from .classify import NO_FLAGS as CLASSIFY_NO_FLAGS
from .classify import ClassifyConfig
from .clustering import ClusterConfig
from .cotypicality import CotypicalityConfig
from .compare import add_parser as add_compare
from .compare import cmd_compare
from .contrast import ContrastConfig
from .localize import add_parser as add_localize
from .localize import cmd_localize
from .data import DatasetError
from .terminal import PrintableOutput, json_alone, printable
from .features import FeatureConfig
from .mining import MineConfig
from .models import ModelError
from .export import FORMATS
from .report import HELP as REPORT_HELP
from .report import ReportConfig
from .rundir import Run, RunError, open_run
from .synthetic import SynthConfig
from .train import TrainConfig
from .translate import METHODS, TranslateConfig
from .trends import TrendsConfig
from .typicality import TypicalityConfig
from .flags import ADAPTIVE_HELP, CHOICES, FIXED_ESTIMATOR_HELP, FIXED_ESTIMATORS, HELP, _flag, add_config, add_run_args, build_config
from .machine import set_threads

SYNTH_HELP = {"per_label": "images generated per label"}


# how the dataset is listed (``prepare``): defaults of the flags below
LISTING_DEFAULTS = {"model": "tiny", "prompt": "An image of {label}.", "null_prompt": "An image.", "resolution": 64,
                    "resize": "square", "holdout": 0.0}


def _data_args(p):
    """``--data`` and the flags that say how it is listed (``prepare``, ``train``, ``run``). --data
    may be left out on a run that lists a dataset (its listing is used as recorded); the listing
    flags default to None, so that one given without --data is refused, not silently unused
    (:func:`_no_listing_flags`; :func:`_fill_listing_defaults` with --data)."""
    p.add_argument("--data", type=Path,
                   help="folder of <label>/<image> files, a .csv/.jsonl manifest (path,label), WebDataset tar shards "
                        "(a .tar, a folder of them or a {0000..0099} pattern), a saved Hugging Face dataset folder or "
                        "hf:NAME_OR_PATH; without it, the run's own dataset, as listed")
    p.add_argument("--model", help="tiny (embedded, default) or sd:PATH_OR_HUB_ID")
    p.add_argument("--prompt", help=f"label prompt; {{label}} is replaced (default: {LISTING_DEFAULTS['prompt']!r})")
    p.add_argument("--null-prompt", help=f"the null prompt (default: {LISTING_DEFAULTS['null_prompt']!r})")
    p.add_argument("--resolution", type=int, help="image side (square) or height (keep-aspect) (default: 64)")
    p.add_argument("--resize", choices=["square", "keep-aspect"], help="how images are resized (default: square)")
    _holdout_arg(p)
    p.set_defaults(**{key: None for key in LISTING_DEFAULTS})


def _holdout_arg(p):
    p.add_argument("--holdout", type=float, default=LISTING_DEFAULTS["holdout"],
                   help="fraction of each label's images held out of training (seeded by --seed); classify, "
                        "localize and evaluate report them first (default: 0)")


def _model_options(args) -> dict:
    options = {}
    if getattr(args, "lora_rank", None):
        options["lora_rank"] = args.lora_rank
    if getattr(args, "text_encoder", None):
        options["text_encoder"] = args.text_encoder
    return options


def _sd_args(p):
    p.add_argument("--lora-rank", type=int, default=0, help="SD only: finetune LoRA adapters of this rank instead of the full UNet")
    p.add_argument("--text-encoder", default=None, help="SD only: another CLIP text encoder (folder or hub id)")


def _threads(text: str) -> int:
    """argparse type of ``--threads``: at least 1, and no more than 4 per CPU of the machine (100,000
    threads failed with a memory error)."""
    value, cpus = int(text), os.cpu_count() or 1
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    if value > 4 * cpus:
        raise argparse.ArgumentTypeError(f"{value} is more than 4 per CPU of this machine ({cpus} CPUs)")
    return value


def _version() -> str:
    """The installed distribution's version; the package's own when run from a source tree."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffmine")
    except PackageNotFoundError:
        from . import __version__

        return __version__


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="diffmine", description="Visual data mining with diffusion models: "
                                   "finetune on labeled images, compute typicality, mine and cluster typical patches.")
    root.add_argument("--version", action="version", version=f"diffmine {_version()}", help="print the version and exit")
    root.add_argument("--debug", action="store_true", default=os.environ.get("DIFFMINE_DEBUG", "") == "1",
                      help="let errors propagate with their traceback (also DIFFMINE_DEBUG=1)")
    root.add_argument("--threads", type=_threads, default=None,
                      help="torch threads on this machine, split between data-parallel processes (default: the CPUs "
                           "this process may use, from its affinity and cgroup quota; or OMP_NUM_THREADS if set)")
    sub = root.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write the built-in synthetic dataset (planted element per label, masks)",
                       description="Write OUT/images/<label>/*.png and OUT/masks/<label>/*.png (nonzero = planted element).")
    p.add_argument("--out", required=True, type=Path, help="the folder to write (images/ and masks/ inside it)")
    add_config(p, SynthConfig, skip=(), help=SYNTH_HELP)

    p = sub.add_parser("prepare", help="list a dataset into a run without training (to score with a given model)",
                       description="List the dataset and record prompts and image size; then e.g. "
                                   "`diffmine typicality --run RUN --model sd:PATH` scores it with pretrained weights. "
                                   "Without --data, list the run's dataset again as it was listed (images added, "
                                   "removed or changed since), with the same prompts and settings.")
    _data_args(p); add_run_args(p)
    p.set_defaults(seed=None)  # --seed only draws the held-out split here: refused without --data

    p = sub.add_parser("train", help="finetune (or train from scratch) the conditional model",
                       description="List the dataset into the run and train the label-conditioned model (resumable). "
                                   "Without --data, train on the images the run lists (continue, or train longer).")
    _data_args(p); add_run_args(p); _sd_args(p)
    _add_train_config(p, TrainConfig.steps)

    p = sub.add_parser("typicality", help="compute per-pixel typicality maps",
                       description="T(x|c) = E[L(x,eps,null) - L(x,eps,c)] per latent pixel, upsampled; sharded and resumable. "
                                   "Data-parallel under `accelerate launch -m diffmine typicality ...`.")
    add_run_args(p)
    p.add_argument("--model", default=None, help="score with this model instead of the run's trained one (e.g. sd:PATH)")
    p.add_argument("--text-encoder", default=None, help="with --model sd:...: another CLIP text encoder (folder or hub id)")
    add_config(p, TypicalityConfig, help={"samples": HELP["typicality_samples"]})
    add_config(p, AdaptiveConfig, prefix="adaptive-", help=ADAPTIVE_HELP)

    p = sub.add_parser("mine", help="mine the most typical patches per label",
                       description="Top patches per image (greedy, non-overlapping), kept if significantly typical (z >= --z-min), "
                                   "then per label; also least typical and random.")
    add_run_args(p)
    add_config(p, MineConfig)

    p = sub.add_parser("cluster", help="DIFT features of the mined patches and k-means per label",
                       description="Features from an up-block of the trained UNet at t=0.161; k-means (k from the number of patches), "
                                   "near-duplicates merged; clusters ranked by median typicality x (coverage in the label - in the others).")
    add_run_args(p)
    add_config(p, ClusterConfig)
    add_config(p, FeatureConfig, prefix="feature-")

    p = sub.add_parser("report", help="write the report site RUN/report/ (open RUN/report/index.html)",
                       description="The visual summary of a run: a static site (overview, one page per label, "
                                   "cluster and shown image; PNG files beside the pages), opens from file://.")
    add_run_args(p)
    p.add_argument("--masks", type=Path, default=None, help="also evaluate against these masks and show the numbers")
    add_config(p, ReportConfig, help=REPORT_HELP)

    p = sub.add_parser("export", help="the clustered patches as COCO, a Hugging Face datasets folder or CSV",
                       description="COCO detection JSON (one image per source image, one annotation per clustered "
                                   "patch, category LABEL/cluster-RANK, score = typicality; FiftyOne and pycocotools "
                                   "read it), a datasets folder of the crops (datasets.load_from_disk), or a CSV. "
                                   "Boxes are in pixels of the image at the run's size. Written outside the run.")
    p.add_argument("--run", required=True, type=Path, help="the run directory (clustered)")
    p.add_argument("--format", required=True, choices=FORMATS, help="coco | hf | csv")
    p.add_argument("--out", required=True, type=Path, help="the folder to write (outside the run)")
    p.add_argument("--copy-images", action="store_true",
                   help="coco: write the images at the run's size to OUT/images/ (the boxes' pixels) and point to them")

    p = sub.add_parser("evaluate", help="localization AP, hit rate and purity against ground-truth masks",
                       description="AUC-PR of typicality vs MASKS/<image_id> (nonzero = element), with the random baseline.")
    p.add_argument("--run", required=True, type=Path, help="the run directory")  # stores nothing: no --seed, --force
    p.add_argument("--masks", required=True, type=Path, help="folder of <label>/<image file name> masks, nonzero = element")
    p.add_argument("--json", action="store_true", help="print JSON")

    for name, text in (("run", "all steps in one go: train, typicality, mine, cluster, report (without --data: "
                                "on the images the run lists, e.g. to finish an interrupted run)"),
                       ("demo", "the built-in dataset through every step, evaluated; prints the report path")):
        p = sub.add_parser(name, help=text, description=text)
        if name == "run":
            _data_args(p)
        else:
            p.add_argument("--model", default="tiny", help=argparse.SUPPRESS)
            _holdout_arg(p)
            add_config(p, SynthConfig, prefix="synth-", skip=("seed",), help=SYNTH_HELP)
        add_run_args(p)
        if name == "run":  # demo's model is the embedded one
            _sd_args(p)
        # demo trains longer than `train`'s default: it should show most planted elements learned,
        # and still finish in under 10 minutes on 2 cores
        _add_train_config(p, DEMO_STEPS if name == "demo" else TrainConfig.steps)
        add_config(p, TypicalityConfig, prefix="typicality-", skip=("seed", "samples", "t_min", "t_max", "estimator"))
        for key in ("samples", "t_min", "t_max", "estimator"):
            field = next(f for f in dataclasses.fields(TypicalityConfig) if f.name == key)
            samples = key == "samples"  # its default is None: resolved by the estimator (16, or 64 adaptive)
            p.add_argument(_flag(key), dest=key, type=int if samples else type(field.default), default=field.default,
                           choices=CHOICES.get(key),
                           help=HELP["typicality_samples"] if samples else f"{HELP[key]} (default: {field.default})")
        # the adaptive estimator targets the mining flags below
        add_config(p, AdaptiveConfig, prefix="adaptive-", skip=("patch", "per_image", "top", "z_min", "significance"))
        add_config(p, MineConfig)
        add_config(p, ClusterConfig)
        add_config(p, FeatureConfig, prefix="feature-")

    add_compare(sub)
    add_localize(sub)
    add_baseline(sub)

    p = sub.add_parser("classify", help="score images under every label: accuracy and confusion matrix",
                       description="Image-level typicality under each label with shared draws; the prediction is the "
                                   "label that explains the image best (Diffusion Classifier's rule). A check that the "
                                   "model learned the labels.")
    add_run_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    add_config(p, ClassifyConfig, skip=("seed", *CLASSIFY_NO_FLAGS),
               help={"estimator": FIXED_ESTIMATOR_HELP}, choices={"estimator": FIXED_ESTIMATORS})

    p = sub.add_parser("translate", help="translate images to every other label (Plug-and-Play or SDEdit)",
                       description="The parallel dataset of paper section 5.1: each (mined) image under every other "
                                   "label. Plug-and-Play: DDIM inversion, then guided generation with the source's "
                                   "residual features and self-attention q/k injected. Sharded and resumable; read with "
                                   "open_run(RUN).translation(image_id, label).")
    add_run_args(p)
    add_config(p, TranslateConfig, help={
        "method": f"{' | '.join(METHODS)}", "images": "source images per label (0: all); most typical mined first",
        "to": "target labels: all, or LABEL,LABEL,...", "steps": "DDIM steps", "guidance": "classifier-free guidance scale",
        "feature_injection": "fraction of steps with the source's residual features injected",
        "attention_injection": "fraction of steps with the source's self-attention queries/keys injected",
        "strength": "fraction of the trajectory regenerated (default: 1.0 with pnp, 0.6 with sdedit)", "batch_size": "translations per forward pass",
        "shard_size": "source images per stored shard"})

    p = sub.add_parser("cotypicality", help="co-typical elements across labels, on the translations",
                       description="Median over labels of each translation's typicality under its label, per patch; "
                                   "top sequences described by per-label UMAP-reduced DIFT features, clustered.")
    add_run_args(p)
    add_config(p, CotypicalityConfig, help={
        "top": "sequences kept overall", "per_tuple": "boxes kept per translated scene",
        "umap_dim": "UMAP dimensions per label block", "k": "k-means clusters of sequences",
        "shard_size": "scenes per stored shard"})
    add_config(p, FeatureConfig, prefix="feature-")

    p = sub.add_parser("contrast", help="what makes label A look unlike label B: contrast maps, mined and clustered",
                       description="C(x | A, B) = E[L(x, eps, B) - L(x, eps, A)] per pixel with the same draws for both "
                                   "prompts: positive where A's prompt explains the pixel better than B's (with --vs all: "
                                   "the smallest margin over every other label). Output: maps sharded and resumable under "
                                   "RUN/contrast/<digest>/ (read with open_run(RUN).contrast_map(image_id, A, B)), their "
                                   "top patches (patches.parquet) clustered into elements (clusters.parquet), and the page "
                                   "RUN/report/contrast-<digest>.html. Cost per image: samples x 2 UNet inputs, as "
                                   "typicality (samples x number of labels with --vs all).")
    add_run_args(p)
    p.add_argument("a", metavar="A", help="the label whose look is explained")
    p.add_argument("b", metavar="B", nargs="?", default=None, help="the label it is contrasted with")
    p.add_argument("--vs", choices=["all"], default=None, help="contrast A with every other label at once (no B)")
    add_config(p, ContrastConfig, help={"images": "A: A's images (default); all: every listed image",
                                        "estimator": FIXED_ESTIMATOR_HELP}, choices={"estimator": FIXED_ESTIMATORS})
    add_config(p, MineConfig)
    add_config(p, ClusterConfig)
    add_config(p, FeatureConfig, prefix="feature-")

    p = sub.add_parser("trends", help="prevalence of every element across ordered labels (eras, decades)",
                       description="For each element cluster of the run: the share of each label's images that contain "
                                   "it (their best-matching box of a grid, nearest to the cluster's DIFT centroid, in the upper group "
                                   "that Otsu's split makes of all images' best matches, two or three groups by AIC) and the median typicality of those boxes. "
                                   "Output: RUN/trends/trends.json {order, elements: [{id, label, size, prevalence, "
                                   "typicality, members, trend}]}, strongest trend first, and RUN/report/trends.html. "
                                   "One feature pass per image (linear in the number of images).")
    add_run_args(p)
    p.add_argument("--order", required=True, help="the labels in order, comma-separated: L1,L2,...")
    p.add_argument("--json", action="store_true", help="print the JSON document")
    add_config(p, TrendsConfig, help={
        "min_size": "clusters with fewer members are not elements",
        "threshold": "split: an image contains the element when its best match is in the upper group of all images' "
                     "best matches (Otsu, two or three groups by AIC); members: when it reaches --percentile of the members' own matches",
        "percentile": "with --threshold members: this percentile of the members' cosine similarity to their centroid",
        "stride": "grid step of the candidate boxes in pixels, at most the patch side (0: an eighth of it)",
        "chunk": "images whose candidate boxes are held in memory at once",
        "candidates": "typical: each image's most typical boxes (as mined); grid: a grid of boxes",
        "per_image": "with --candidates typical: boxes per image"})

    p = sub.add_parser("status", help="what is done, what is left, which files were bad", description="Progress of a run.")
    p.add_argument("--run", required=True, type=Path, help="the run directory")

    p = sub.add_parser("clean", help="remove the temporary files of interrupted writes (status counts them)",
                       description="Remove the temporary files (NAME.<random>.diffmine.tmp) that processes killed while writing "
                                   "left in the run, and nothing else. Refused while a diffmine process runs a step of the "
                                   "run (its temporary files may be writes in progress); steps starting meanwhile wait.")
    p.add_argument("--run", required=True, type=Path, help="the run directory")

    p = sub.add_parser("relocate", help="use a copied Stable Diffusion run with its base model at another path",
                       description="Check that FOLDER holds the files the run's model was trained on (their "
                                   "fingerprint, recorded in RUN/model/backend.json at training) and record it in "
                                   "RUN/model/base-location.json: later steps load the base from there. The model's "
                                   "identity, and so every result made with it, is unchanged.")
    p.add_argument("--run", required=True, type=Path, help="the run directory (a Stable Diffusion model trained from a folder)")
    p.add_argument("--sd-base", type=Path, default=None, metavar="FOLDER", help="the base model's folder on this machine")
    p.add_argument("--text-encoder", type=Path, default=None, metavar="FOLDER",
                   help="the folder of the separate text encoder (a run trained with --text-encoder FOLDER) on this machine")
    p.add_argument("--force", action="store_true",
                   help="use a folder that cannot be verified (a run trained before fingerprints were recorded); "
                        "a folder whose files differ is refused even so")

    p = sub.add_parser("query", help="SQL (DuckDB) over the run's Parquet tables",
                       description="Tables: images, patches (clustered when available), mined, typicality, problems.")
    p.add_argument("--run", required=True, type=Path, help="the run directory")
    p.add_argument("sql", help="one SQL statement (read-only; several are refused), e.g. \"SELECT label, count(*) FROM patches GROUP BY label\"")
    return root


# ----------------------------------------------------------------------------------------------


def cmd_synth(args):
    from .synthetic import generate

    images = generate(args.out, build_config(SynthConfig, args))
    print(f"images: {images}\nmasks:  {args.out / 'masks'}")


def _prepare(args, run):
    from . import pipeline

    pipeline.prepare(run, args.data, args.prompt, args.null_prompt, args.resolution, args.resize, args.model,
                     args.holdout, args.seed, args.force, _model_options(args))


def _fill_listing_defaults(args, keys=tuple(LISTING_DEFAULTS)) -> None:
    """The listing flags not given get their defaults (``train``, ``run``, ``prepare`` with --data)."""
    vars(args).update({key: {**LISTING_DEFAULTS, "seed": 0}[key] for key in keys if getattr(args, key) is None})


def _no_listing_flags(args, keys=tuple(LISTING_DEFAULTS)) -> None:
    """Without --data the run's listing is used as recorded: a flag that would list it otherwise
    is refused, not silently unused."""
    given = [_flag(key) for key in keys if getattr(args, key) is not None]
    if given:
        raise RunError(f"{', '.join(given)} set{'s' * (len(given) == 1)} how a dataset is listed: pass --data with them")


DEMO_STEPS = 800


def _add_train_config(p, new_steps: int) -> None:
    """Training's flags; ``--steps`` not given is the run's trained model's steps (`run --run RUN` on a
    run `demo` made trains nothing more, and is not refused for asking fewer), else ``new_steps``."""
    add_config(p, TrainConfig, defaults={"steps": None}, help={"steps": (
        f"optimizer steps; training resumes from the last checkpoint up to this many (not given: the steps of the "
        f"model the run holds, else {new_steps})")})
    p.set_defaults(new_model_steps=new_steps)


def _train(args, run):
    from . import pipeline
    from .models import check_options

    if args.steps is None:
        recorded = (run.lineage.get("model") or {}).get("steps")
        args.steps = recorded if isinstance(recorded, int) and recorded > 0 else args.new_model_steps

    if args.data is None:  # `train --run RUN`: the images and prompts the run lists
        _no_listing_flags(args)
        check_options(pipeline.listing_flags(run)["model"], _model_options(args))
    else:
        _fill_listing_defaults(args)
        check_options(args.model, _model_options(args))  # before the dataset is listed into the run
        _prepare(args, run)
    pipeline.train_step(run, build_config(TrainConfig, args), _model_options(args), force=args.force)


def cmd_prepare(args):
    from . import pipeline

    run = Run(args.run)
    if args.data is None:  # the run's dataset again, as it was listed: images added, removed or changed
        _no_listing_flags(args, (*LISTING_DEFAULTS, "seed"))
        args.data, recorded = pipeline.listed_source(run)
        vars(args).update(recorded)
        print(printable(f"prepare: listing the run's dataset again from {args.data}"))  # a received run's record names it
    else:
        _fill_listing_defaults(args, (*LISTING_DEFAULTS, "seed"))
    _prepare(args, run)
    print(f"listed {len(run.images())} images into {args.run}")


def cmd_train(args):
    _train(args, Run(args.run))
    print(f"model: {args.run / 'model'}")


def cmd_typicality(args, prefix=""):
    from . import pipeline

    config = build_config(TypicalityConfig, args, prefix)
    model = getattr(args, "model", None) if not prefix else None
    pipeline.typicality_step(open_run(args.run), config, model, _model_options(args) if model else None, force=args.force,
                             adaptive=build_config(AdaptiveConfig, args, "adaptive-"))


def cmd_mine(args):
    from . import pipeline

    patches = pipeline.mine_step(open_run(args.run), build_config(MineConfig, args), force=args.force)
    print(f"mined {int((patches['kind'] == 'top').sum())} top patches -> {args.run / 'mining' / 'patches.parquet'}")


def cmd_cluster(args):
    from . import pipeline

    clustered = pipeline.cluster_step(open_run(args.run), build_config(ClusterConfig, args),
                                      build_config(FeatureConfig, args, "feature-"), force=args.force)
    if clustered is None:  # another process of a data-parallel run: process 0 clusters
        return
    print(f"{clustered.groupby('label')['cluster'].nunique().sum()} clusters -> {args.run / 'clusters' / 'patches.parquet'}")


def cmd_report(args):
    from . import pipeline

    config = build_config(ReportConfig, args) if hasattr(args, "examples") else ReportConfig()
    path = pipeline.report_step(open_run(args.run), config, getattr(args, "masks", None), force=args.force)
    print(f"report: {path.resolve()}")
    return path


def cmd_export(args):
    from . import pipeline

    path = pipeline.export_step(open_run(args.run), args.format, args.out, args.copy_images)
    print(f"export ({args.format}): {path.resolve()}")
    return path


def cmd_evaluate(args):
    from .evaluate import evaluate_run, format_result

    result = evaluate_run(open_run(args.run), args.masks)
    print(json.dumps(result, indent=2) if args.json else format_result(result))
    return result


def _all_steps(args, run, masks=None):
    from . import pipeline

    from .mining import check_patch

    # the later steps' settings checked before the first trains for minutes (a --patch larger than
    # the images was refused only at mine, after training and typicality)
    mine, cluster = build_config(MineConfig, args), build_config(ClusterConfig, args)
    features = build_config(FeatureConfig, args, "feature-")
    if args.data is not None:
        _fill_listing_defaults(args)
    check_patch(run, mine.patch, side=args.resolution)  # None: the listed run's
    timings = {}
    t0 = time.time()
    _train(args, run)
    timings["train"] = time.time() - t0
    t0 = time.time()
    cmd_typicality(args, prefix="typicality-")
    timings["typicality"] = time.time() - t0
    t0 = time.time()
    pipeline.mine_step(run, mine, force=args.force)
    pipeline.cluster_step(run, cluster, features, force=args.force)
    timings["mine+cluster"] = time.time() - t0
    if masks is not None:
        from .evaluate import evaluate_run, format_result

        print(format_result(evaluate_run(run, masks)))
    args.masks = masks
    cmd_report(args)
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))


def cmd_run(args):
    run = Run(args.run)
    # `run --run RUN` goes on with the run as it is: a report made with masks (`demo`'s, or
    # `report --masks`) keeps them while they are there (`run` takes no --masks)
    recorded = ((run.lineage.get("report") or {}).get("paths") or {}).get("masks") if args.data is None else None
    _all_steps(args, run, masks=Path(recorded) if isinstance(recorded, str) and Path(recorded).is_dir() else None)


def cmd_demo(args):
    from .synthetic import generate

    config = build_config(SynthConfig, args, "synth-")
    data_dir = args.run / "data"
    args.data = generate(data_dir, dataclasses.replace(config, seed=args.seed))
    args.prompt, args.null_prompt = "A scene from {label}.", "A scene."
    args.resolution, args.resize = config.size, "square"
    _all_steps(args, Run(args.run), masks=data_dir / "masks")


def cmd_classify(args):
    from . import pipeline
    from .classify import format_summary

    with json_alone(args.json):
        summary = pipeline.classify_step(open_run(args.run), build_config(ClassifyConfig, args), force=args.force)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))


def cmd_translate(args):
    from . import pipeline

    written = pipeline.translate_step(open_run(args.run), build_config(TranslateConfig, args), force=args.force)
    print(f"{written} shards written -> {args.run / 'translations'}")


def cmd_cotypicality(args):
    from . import pipeline

    sequences = pipeline.cotypicality_step(open_run(args.run), build_config(CotypicalityConfig, args),
                                           build_config(FeatureConfig, args, "feature-"), force=args.force)
    print(f"{len(sequences)} sequences in {sequences['cluster'].nunique()} clusters -> "
          f"{args.run / 'cotypicality' / 'sequences.parquet'}")


def cmd_baseline(args):
    from . import pipeline
    from .baselines.doersch import OUTPUT, DoerschConfig, check_size

    run = Run(args.run)
    config = build_config(DoerschConfig, args)  # refused settings list no dataset
    if run.lineage.get("listing") is None:
        if args.data is None:
            raise RunError(f"{run.path}: no dataset listed here; pass --data DIR")
        check_size(args.resolution, config)
        pipeline.prepare(run, args.data, args.prompt, args.null_prompt, args.resolution, args.resize, force=args.force,
                         for_model=False)
    table = pipeline.baseline_step(run, config, args.positive, force=args.force)
    n = table.groupby("label")["cluster"].nunique().sum() if len(table) else 0
    print(f"{n} detectors, {len(table)} detections -> {args.run / OUTPUT / 'patches.parquet'}")
    return table


def cmd_contrast(args):
    from . import pipeline

    if (args.vs is None) == (args.b is None):
        raise ValueError("give either a label B or --vs all")
    page = pipeline.contrast_step(open_run(args.run), args.a, args.b, build_config(ContrastConfig, args),
                                  build_config(MineConfig, args), build_config(ClusterConfig, args),
                                  build_config(FeatureConfig, args, "feature-"), force=args.force)
    print(f"contrast -> {page.parent.parent / 'contrast'}; page: {page.resolve()}")


def cmd_trends(args):
    from . import pipeline

    order = [label.strip() for label in args.order.split(",") if label.strip()]
    with json_alone(args.json):
        result = pipeline.trends_step(open_run(args.run), order, build_config(TrendsConfig, args), force=args.force)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for el in result["elements"][:10]:
        print(f"#{el['id']:<3} {el['direction']:<7} trend {el['trend']:+.3f}  {printable(el['label'])}/{el['cluster']} "
              f"({el['size']}): " + " ".join(f"{p:.2f}" for p in el["prevalence"]))
    print(f"{len(result['elements'])} elements -> {args.run / 'trends' / 'trends.json'}")


def cmd_status(args):
    from .status import status

    print(status(open_run(args.run)))


def cmd_clean(args):
    from .leftovers import clean

    print(clean(Run(args.run)))


def cmd_relocate(args):
    from .relocate import relocate

    print("\n".join(relocate(args.run, args.sd_base, args.text_encoder, args.force)))


def cmd_query(args):
    from .query import query

    print(query(open_run(args.run), args.sql).to_string(index=False))


COMMANDS = {"synth": cmd_synth, "prepare": cmd_prepare, "train": cmd_train, "compare": cmd_compare, "localize": cmd_localize, "baseline": cmd_baseline, "typicality": cmd_typicality, "mine": cmd_mine, "cluster": cmd_cluster,
            "report": cmd_report, "evaluate": cmd_evaluate, "run": cmd_run, "demo": cmd_demo, "status": cmd_status,
            "clean": cmd_clean, "query": cmd_query, "relocate": cmd_relocate, "classify": cmd_classify, "export": cmd_export,
            "translate": cmd_translate, "cotypicality": cmd_cotypicality, "contrast": cmd_contrast, "trends": cmd_trends}


def _error_message(exc: BaseException) -> str | None:
    """The one line an expected failure is reported as; None for a bug (traceback then)."""
    if isinstance(exc, KeyError):
        return str(exc.args[0]) if exc.args else "KeyError"
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:  # disk full, read-only, permissions
        names = f"{exc.filename} -> {exc.filename2}" if exc.filename2 is not None else f"{exc.filename}"
        return f"{names}: {exc.strerror}"
    duckdb = sys.modules.get("duckdb")  # loaded by `query` only; its errors are the SQL's fault
    if isinstance(exc, (DatasetError, RunError, ModelError, ValueError, OSError)) or (
            duckdb is not None and isinstance(exc, duckdb.Error)):
        return str(exc)
    return None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    set_threads(args.threads)  # before any work: torch's default oversubscribes shared or quota-limited CPUs
    if args.debug:
        with contextlib.redirect_stdout(PrintableOutput(sys.stdout)):
            COMMANDS[args.command](args)
        return 0
    try:
        # what the commands print holds labels, paths and query results: untrusted text
        with contextlib.redirect_stdout(PrintableOutput(sys.stdout)):
            COMMANDS[args.command](args)
    except KeyboardInterrupt:  # Ctrl-C: what was written stays (shards, checkpoints); no traceback
        print(f"diffmine {args.command}: interrupted; run the same command again (training and the sharded steps go "
              "on where they stopped)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `diffmine classify --json | head`: the reader has gone, nothing to say
        # the interpreter flushes stdout once more at exit: into /dev/null, not the closed pipe
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:
        message = _error_message(exc)
        if message is None:
            raise
        # one line, whatever the message holds (DuckDB adds the query and a caret below); paths and
        # labels in it are untrusted text, never terminal control sequences
        first = next((line.strip() for line in message.splitlines() if line.strip()), type(exc).__name__)
        print(printable(f"diffmine {args.command}: error: {first}"), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

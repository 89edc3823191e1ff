"""Command line: ``diffmine <step> --run RUN ...``; each step reads and writes the run directory.

Options are generated from the steps' config dataclasses, so a flag and its default live in one
place; ``diffmine run`` takes every step's flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from .baselines.doersch import add_parser as add_baseline
from .baselines.doersch import cmd_baseline
from .classify import ClassifyConfig
from .clustering import ClusterConfig
from .cotypicality import CotypicalityConfig
from .compare import add_parser as add_compare
from .compare import cmd_compare
from .localize import add_parser as add_localize
from .localize import cmd_localize
from .data import DatasetError
from .features import FeatureConfig
from .mining import MineConfig
from .models import ModelError
from .report import ReportConfig
from .rundir import Run, RunError
from .synthetic import SynthConfig
from .train import TrainConfig
from .translate import METHODS, TranslateConfig
from .typicality import ESTIMATORS, TypicalityConfig

HELP = {
    "steps": "optimizer steps (training resumes from the last checkpoint up to this many)",
    "batch_size": "images per step (training) / UNet inputs per forward pass (typicality; 0: 64 on CPU, 256 on GPU) / images per pass (features)",
    "learning_rate": "AdamW learning rate (default: the backend's)",
    "p_uncond": "probability of replacing the label prompt with the null prompt in training",
    "mixed_precision": "no | bf16 | fp16 (accelerate)",
    "ema_decay": "keep an EMA of the weights (e.g. 0.999; 0 = off)",
    "checkpoint_every": "save a resumable checkpoint every N steps",
    "keep_checkpoints": "how many checkpoints to keep",
    "samples": "K, the number of (t, eps) draws per image",
    "t_min": "lower end of the diffusion time range (fraction of T)",
    "t_max": "upper end of the diffusion time range (fraction of T)",
    "estimator": f"{' | '.join(ESTIMATORS)}: 'paper' draws t and eps i.i.d.; 'stratified' one t per stratum; "
                 "'stratified-antithetic' also pairs eps with -eps",
    "shard_size": "images per stored shard (unit of work and resume)",
    "map_dtype": "storage precision of typicality maps (float16 | float32)",
    "precision": "fp32 | bf16 | fp16 autocast of the UNet forward",
    "workers": "image-decoding processes prefetching ahead of the model",
    "compile": "torch.compile the UNet (~1.25x per pass on CPU after ~1.5 min of compiling)",
    "patch": "patch side in pixels (default: about 1/5 of the image side)",
    "per_image": "non-overlapping patches kept per image",
    "top": "most typical patches kept per label",
    "least": "least typical patches kept per label (comparison)",
    "random": "random patches kept per label (comparison)",
    "k": "k-means clusters per label",
    "t": "diffusion time of the DIFT features (fraction of T)",
    "block": "UNet up-block whose output gives the features (default: the backend's)",
    "ensemble": "noise draws averaged per DIFT feature",
    "per_label": "images per label (0: all), a seeded random choice",
}


def _flag(name: str, prefix: str = "") -> str:
    return "--" + (prefix + name).replace("_", "-").lower()


def add_config(parser: argparse.ArgumentParser, cls, prefix: str = "", skip: tuple[str, ...] = ("seed",),
               help: dict[str, str] | None = None) -> None:
    """One option per dataclass field, e.g. ``TypicalityConfig.t_min`` -> ``--t-min``; ``help``
    overrides the shared help text of a field for this parser."""
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        default = field.default
        kind = {"int": int, "float": float, "str": str, "bool": bool}.get(str(field.type).split(" ")[0].split("|")[0].strip())
        help_text = (help or {}).get(field.name, HELP.get(field.name, ""))
        dest = prefix.replace("-", "_") + field.name
        if kind is bool:
            parser.add_argument(_flag(field.name, prefix), dest=dest, action=argparse.BooleanOptionalAction,
                                default=default, help=help_text)
        elif isinstance(default, tuple):  # e.g. scales: (1.0, 0.75) <- --scales 1.0 0.75
            parser.add_argument(_flag(field.name, prefix), dest=dest, type=type(default[0]), nargs="+",
                                default=list(default), help=f"{help_text} (default: {' '.join(map(str, default))})")
        else:
            parser.add_argument(_flag(field.name, prefix), dest=dest, type=kind or str, default=default,
                                help=f"{help_text} (default: {default})".strip())


def build_config(cls, args: argparse.Namespace, prefix: str = ""):
    values = {}
    for field in dataclasses.fields(cls):
        dest = prefix.replace("-", "_") + field.name
        if field.name == "seed":
            values["seed"] = args.seed
        elif hasattr(args, dest):
            values[field.name] = getattr(args, dest)
        elif prefix and field.name in HELP and hasattr(args, field.name):
            values[field.name] = getattr(args, field.name)  # shared flag, e.g. --samples in `run`
    return cls(**values)


def _run_arg(p):
    p.add_argument("--run", required=True, type=Path, help="the run directory")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice of this step (default: 0)")


def _data_args(p):
    p.add_argument("--data", required=True, type=Path, help="folder of <label>/<image> files, or a .csv/.jsonl manifest (path,label)")
    p.add_argument("--model", default="tiny", help="tiny (embedded, default) or sd:PATH_OR_HUB_ID")
    p.add_argument("--prompt", default="An image of {label}.", help="label prompt; {label} is replaced (default: %(default)r)")
    p.add_argument("--null-prompt", default="An image.", help="the null prompt (default: %(default)r)")
    p.add_argument("--resolution", type=int, default=64, help="image side (square) or height (keep-aspect) (default: 64)")
    p.add_argument("--resize", default="square", choices=["square", "keep-aspect"], help="how images are resized")


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


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="diffmine", description="Visual data mining with diffusion models: "
                                   "finetune on labeled images, compute typicality, mine and cluster typical patches.")
    sub = root.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write the built-in synthetic dataset (planted element per label, masks)",
                       description="Write OUT/images/<label>/*.png and OUT/masks/<label>/*.png (nonzero = planted element).")
    p.add_argument("--out", required=True, type=Path)
    add_config(p, SynthConfig, skip=())

    p = sub.add_parser("prepare", help="list a dataset into a run without training (to score with a given model)",
                       description="List the dataset and record prompts and image size; then e.g. "
                                   "`diffmine typicality --run RUN --model sd:PATH` scores it with pretrained weights.")
    _data_args(p); _run_arg(p)

    p = sub.add_parser("train", help="finetune (or train from scratch) the conditional model",
                       description="List the dataset into the run and train the label-conditioned model (resumable).")
    _data_args(p); _run_arg(p); _sd_args(p)
    add_config(p, TrainConfig)

    p = sub.add_parser("typicality", help="compute per-pixel typicality maps",
                       description="T(x|c) = E[L(x,eps,null) - L(x,eps,c)] per latent pixel, upsampled; sharded and resumable. "
                                   "Data-parallel under `accelerate launch -m diffmine typicality ...`.")
    _run_arg(p)
    p.add_argument("--model", default=None, help="score with this model instead of the run's trained one (e.g. sd:PATH)")
    p.add_argument("--text-encoder", default=None, help="with --model sd:...: another CLIP text encoder (folder or hub id)")
    add_config(p, TypicalityConfig)

    p = sub.add_parser("mine", help="mine the most typical patches per label",
                       description="Top patches per image (greedy, non-overlapping), then per label; also least typical and random.")
    _run_arg(p)
    add_config(p, MineConfig)

    p = sub.add_parser("cluster", help="DIFT features of the mined patches and k-means per label",
                       description="Features from an up-block of the trained UNet at t=0.161; k-means; clusters ranked by median typicality.")
    _run_arg(p)
    add_config(p, ClusterConfig)
    add_config(p, FeatureConfig, prefix="feature-")

    p = sub.add_parser("report", help="write RUN/report/index.html", description="The visual summary of a run, one self-contained HTML page.")
    _run_arg(p)
    p.add_argument("--masks", type=Path, default=None, help="also evaluate against these masks and show the numbers")
    add_config(p, ReportConfig)

    p = sub.add_parser("evaluate", help="localization AP, hit rate and purity against ground-truth masks",
                       description="AUC-PR of typicality vs MASKS/<image_id> (nonzero = element), with the random baseline.")
    _run_arg(p)
    p.add_argument("--masks", required=True, type=Path)
    p.add_argument("--json", action="store_true", help="print JSON")

    for name, text in (("run", "all steps in one go: train, typicality, mine, cluster, report"),
                       ("demo", "the built-in dataset through every step, evaluated; prints the report path")):
        p = sub.add_parser(name, help=text, description=text)
        if name == "run":
            _data_args(p)
        else:
            p.add_argument("--model", default="tiny", help=argparse.SUPPRESS)
            add_config(p, SynthConfig, prefix="synth-", skip=("seed",))
        _run_arg(p); _sd_args(p)
        add_config(p, TrainConfig)
        add_config(p, TypicalityConfig, prefix="typicality-", skip=("seed", "samples", "t_min", "t_max", "estimator"))
        for key in ("samples", "t_min", "t_max", "estimator"):
            field = next(f for f in dataclasses.fields(TypicalityConfig) if f.name == key)
            p.add_argument(_flag(key), dest=key, type=type(field.default), default=field.default, help=HELP[key])
        add_config(p, MineConfig)
        add_config(p, ClusterConfig)
        add_config(p, FeatureConfig, prefix="feature-")
        if name == "demo":
            # longer than `train`'s default: the demo should show most planted elements learned,
            # and still finish in under 10 minutes on 2 cores
            p.set_defaults(steps=800)

    add_compare(sub)
    add_localize(sub)
    add_baseline(sub)

    p = sub.add_parser("classify", help="score images under every label: accuracy and confusion matrix",
                       description="Image-level typicality under each label with shared draws; the prediction is the "
                                   "label that explains the image best (Diffusion Classifier's rule). A check that the "
                                   "model learned the labels.")
    _run_arg(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    add_config(p, ClassifyConfig, skip=("seed", "shard_size", "map_dtype"))

    p = sub.add_parser("translate", help="translate images to every other label (Plug-and-Play or SDEdit)",
                       description="The parallel dataset of paper section 5.1: each (mined) image under every other "
                                   "label. Plug-and-Play: DDIM inversion, then guided generation with the source's "
                                   "residual features and self-attention q/k injected. Sharded and resumable; read with "
                                   "open_run(RUN).translation(image_id, label).")
    _run_arg(p)
    add_config(p, TranslateConfig, help={
        "method": f"{' | '.join(METHODS)}", "images": "source images per label (0: all); most typical mined first",
        "to": "target labels: all, or LABEL,LABEL,...", "steps": "DDIM steps", "guidance": "classifier-free guidance scale",
        "feature_injection": "fraction of steps with the source's residual features injected",
        "attention_injection": "fraction of steps with the source's self-attention queries/keys injected",
        "strength": "sdedit: fraction of the trajectory regenerated", "batch_size": "translations per forward pass",
        "shard_size": "source images per stored shard"})

    p = sub.add_parser("cotypicality", help="co-typical elements across labels, on the translations",
                       description="Median over labels of each translation's typicality under its label, per patch; "
                                   "top sequences described by per-label UMAP-reduced DIFT features, clustered.")
    _run_arg(p)
    add_config(p, CotypicalityConfig, help={
        "top": "sequences kept overall", "per_tuple": "boxes kept per translated scene",
        "umap_dim": "UMAP dimensions per label block", "k": "k-means clusters of sequences",
        "shard_size": "scenes per stored shard"})
    add_config(p, FeatureConfig, prefix="feature-")

    p = sub.add_parser("status", help="what is done, what is left, which files were bad", description="Progress of a run.")
    p.add_argument("--run", required=True, type=Path)

    p = sub.add_parser("query", help="SQL (DuckDB) over the run's Parquet tables",
                       description="Tables: images, patches (clustered when available), mined, typicality, problems.")
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("sql")
    return root


# ----------------------------------------------------------------------------------------------


def cmd_synth(args):
    from .synthetic import generate

    images = generate(args.out, build_config(SynthConfig, args))
    print(f"images: {images}\nmasks:  {args.out / 'masks'}")


def _train(args, run):
    from . import pipeline

    pipeline.prepare(run, args.data, args.prompt, args.null_prompt, args.resolution, args.resize, args.model)
    pipeline.train_step(run, build_config(TrainConfig, args), _model_options(args))


def cmd_prepare(args):
    from . import pipeline

    pipeline.prepare(Run(args.run), args.data, args.prompt, args.null_prompt, args.resolution, args.resize, args.model)
    print(f"listed {len(Run(args.run).images())} images into {args.run}")


def cmd_train(args):
    _train(args, Run(args.run))
    print(f"model: {args.run / 'model'}")


def cmd_typicality(args, prefix=""):
    from . import pipeline

    config = build_config(TypicalityConfig, args, prefix)
    model = getattr(args, "model", None) if not prefix else None
    pipeline.typicality_step(Run(args.run), config, model, _model_options(args) if model else None)


def cmd_mine(args):
    from . import pipeline

    patches = pipeline.mine_step(Run(args.run), build_config(MineConfig, args))
    print(f"mined {int((patches['kind'] == 'top').sum())} top patches -> {args.run / 'mining' / 'patches.parquet'}")


def cmd_cluster(args):
    from . import pipeline

    clustered = pipeline.cluster_step(Run(args.run), build_config(ClusterConfig, args), build_config(FeatureConfig, args, "feature-"))
    if clustered is None:  # another process of a data-parallel run: process 0 clusters
        return
    print(f"{clustered.groupby('label')['cluster'].nunique().sum()} clusters -> {args.run / 'clusters' / 'patches.parquet'}")


def cmd_report(args, evaluation=None):
    from .evaluate import evaluate_run
    from .report import write_report

    run = Run(args.run)
    if evaluation is None and getattr(args, "masks", None):
        evaluation = evaluate_run(run, args.masks)
    path = write_report(run, build_config(ReportConfig, args) if hasattr(args, "examples") else ReportConfig(), evaluation)
    print(f"report: {path.resolve()}")
    return path


def cmd_evaluate(args):
    from .evaluate import evaluate_run, format_result

    result = evaluate_run(Run(args.run), args.masks)
    print(json.dumps(result, indent=2) if args.json else format_result(result))
    return result


def _all_steps(args, run, masks=None):
    from . import pipeline

    timings = {}
    t0 = time.time()
    _train(args, run)
    timings["train"] = time.time() - t0
    t0 = time.time()
    cmd_typicality(args, prefix="typicality-")
    timings["typicality"] = time.time() - t0
    t0 = time.time()
    pipeline.mine_step(run, build_config(MineConfig, args))
    pipeline.cluster_step(run, build_config(ClusterConfig, args), build_config(FeatureConfig, args, "feature-"))
    timings["mine+cluster"] = time.time() - t0
    evaluation = None
    if masks is not None:
        from .evaluate import evaluate_run, format_result

        evaluation = evaluate_run(run, masks)
        print(format_result(evaluation))
    cmd_report(args, evaluation)
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))


def cmd_run(args):
    _all_steps(args, Run(args.run))


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
    from .classify import format_summary, run_classify

    run = Run(args.run)
    summary = run_classify(run, pipeline.scoring_model(run), build_config(ClassifyConfig, args))
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))


def cmd_translate(args):
    from . import pipeline

    written = pipeline.translate_step(Run(args.run), build_config(TranslateConfig, args))
    print(f"{written} shards written -> {args.run / 'translations'}")


def cmd_cotypicality(args):
    from . import pipeline

    sequences = pipeline.cotypicality_step(Run(args.run), build_config(CotypicalityConfig, args),
                                           build_config(FeatureConfig, args, "feature-"))
    print(f"{len(sequences)} sequences in {sequences['cluster'].nunique()} clusters -> "
          f"{args.run / 'cotypicality' / 'sequences.parquet'}")


def cmd_status(args):
    from .status import status

    print(status(Run(args.run)))


def cmd_query(args):
    from .query import query

    print(query(Run(args.run), args.sql).to_string(index=False))


COMMANDS = {"synth": cmd_synth, "prepare": cmd_prepare, "train": cmd_train, "compare": cmd_compare, "localize": cmd_localize, "baseline": cmd_baseline, "typicality": cmd_typicality, "mine": cmd_mine, "cluster": cmd_cluster,
            "report": cmd_report, "evaluate": cmd_evaluate, "run": cmd_run, "demo": cmd_demo, "status": cmd_status,
            "query": cmd_query, "classify": cmd_classify,
            "translate": cmd_translate, "cotypicality": cmd_cotypicality}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (DatasetError, RunError, ModelError, FileNotFoundError, KeyError, ValueError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"diffmine {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Two runs side by side: one self-contained HTML page (Jinja2, images inlined: one file to share).

Typical use: the same dataset scored by a finetuned model and by the pretrained one
(``diffmine typicality --model sd:PATH``), to see what finetuning changed. The page shows

- the mean typicality per label in each run (over all images each run scored, and over the
  images both scored);
- for images both runs scored, each run's typicality map over the image, side by side, with
  the Pearson correlation of the two maps; every overlay of the page on one colour scale (the
  99th percentile of |T| over all of them, with its colour bar), so a weaker map looks weaker;
- each run's most typical mined patches per label, side by side.

    diffmine compare --run RUN_A --run RUN_B [--out PAGE.html]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from jinja2 import Environment
from PIL import Image

from .atomic import write_text
from .lineage import step_lock
from .images import RunImages, colorbar, map_scale, overlay, png_data_uri
from .rundir import Run, RunError, open_run
from .terminal import print_problems, printable

# the page's mark, which `--out` looks for before it replaces a file (a file of the user's is kept)
GENERATOR = '<meta name="generator" content="diffmine compare">'

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">""" + GENERATOR + """<title>{{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: .5em 0 1.5em; }
td, th { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
.pair { display: flex; gap: 2em; flex-wrap: wrap; }
.crops img { margin: 1px; image-rendering: pixelated; }
figure { display: inline-block; margin: 4px; text-align: center; font-size: 12px; }
figure img { width: {{ map_px }}px; image-rendering: pixelated; }
.note { color: #666; font-size: 90%; }
code { background: #f4f4f4; padding: 0 3px; }
</style></head><body>
<h1>{{ title }}</h1>
<p>A: <code>{{ a.path }}</code> (model: <code>{{ a.model }}</code>)<br>
B: <code>{{ b.path }}</code> (model: <code>{{ b.model }}</code>)</p>

<h2>Mean typicality per label</h2>
<table><tr><th>label</th><th>images A</th><th>mean A</th><th>images B</th><th>mean B</th>
<th>shared images</th><th>mean A (shared)</th><th>mean B (shared)</th></tr>
{% for row in means %}<tr><td>{{ row.label }}</td><td>{{ row.n_a }}</td><td>{{ row.mean_a }}</td><td>{{ row.n_b }}</td>
<td>{{ row.mean_b }}</td><td>{{ row.n_shared }}</td><td>{{ row.shared_a }}</td><td>{{ row.shared_b }}</td></tr>{% endfor %}
</table>

<h2>Typicality maps of images both runs scored</h2>
<p class="note">{{ shared_count }} image(s) scored by both runs; red: the label explains the pixel better
than the null prompt, blue: worse. Every overlay of this page uses the colour scale below (the 99th
percentile of |T| over all of them); r is the Pearson correlation of the two maps.</p>
{% if colorbar %}<img src="{{ colorbar }}" alt="colour scale" style="max-width: 40em">{% endif %}
{% for label in labels %}
<h3>{{ label.name }}</h3>
{% if not label.examples %}<p class="note">no image of this label scored by both runs</p>{% endif %}
{% for ex in label.examples %}
<figure><img src="{{ ex.image }}" alt="image"><figcaption>{{ ex.image_id }}</figcaption></figure>
<figure><img src="{{ ex.a }}" alt="A"><figcaption>A: mean {{ ex.mean_a }}</figcaption></figure>
<figure><img src="{{ ex.b }}" alt="B"><figcaption>B: mean {{ ex.mean_b }}</figcaption></figure>
<span class="note">r = {{ ex.r }}</span><br>
{% endfor %}
{% endfor %}

<h2>Most typical patches per label</h2>
{% for label in labels %}
<h3>{{ label.name }}</h3>
<div class="pair">
{% for side in label.patches %}
<div><b>{{ side.name }}</b>{% if side.note %} <span class="note">({{ side.note }})</span>{% endif %}<div class="crops">
{% for crop in side.crops %}<img src="{{ crop.src }}" title="{{ crop.title }}" width="{{ crop_px }}" height="{{ crop_px }}" alt="patch">{% endfor %}
</div></div>
{% endfor %}
</div>
{% endfor %}
</body></html>
"""


def _fmt(x: float) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.4g}"


def _model_name(run: Run) -> str:
    """The model that scored the run: its own trained one, or the one given to ``typicality --model``
    (a local folder named where the record says it was read)."""
    record = run.lineage.get("typicality") or {}
    model = str(record.get("settings", {}).get("model", "run"))
    if model == "run":
        return f"{run.step_config('dataset').get('model', '?')} (trained in this run)"
    location = record.get("location")
    if isinstance(location, dict) and "base" in location:
        return f"{model.split(':', 1)[0]}:{location['base']}"
    return model


def _ok_index(run: Run) -> pd.DataFrame:
    index = run.typicality_index()
    return index[index["status"] == "ok"]


def _top_patches(run: Run, label: str, images: RunImages, n: int, crop_px: int) -> tuple[list[dict], str | None]:
    try:
        patches = run.patches("top")
    except RunError:  # not clustered, or out of date: never shown as if current
        return [], "not mined yet" if run.lineage.get("mine") is None else "mined patches out of date"
    patches = patches[patches["label"] == label].sort_values("typicality", ascending=False).head(n)
    crops = []
    for row in patches.itertuples():
        image = images.get(row.image_id)
        if image is None:
            continue
        crop = Image.fromarray(image[row.y0:row.y1, row.x0:row.x1]).resize((crop_px, crop_px), Image.Resampling.NEAREST)
        crops.append({"src": png_data_uri(np.asarray(crop)),
                      "title": f"{row.image_id} ({row.x0},{row.y0})-({row.x1},{row.y1}) T={row.typicality:.4g}"})
    return crops, (None if crops else "no patches for this label")


def build_context(run_a: Run, run_b: Run, examples: int = 4, crops: int = 10, crop_px: int = 64, map_px: int = 128) -> dict:
    index_a, index_b = _ok_index(run_a), _ok_index(run_b)
    images_a, images_b = RunImages(run_a), RunImages(run_b)
    labels_a = run_a.labels
    label_names = labels_a + [l for l in run_b.labels if l not in labels_a]
    # an image is compared where both runs scored the same bytes: an id alone may name other pixels in
    # the other run (another collection under the same file names), whose map is of another image
    same = set(zip(index_a["image_id"], index_a["fingerprint"])) & set(zip(index_b["image_id"], index_b["fingerprint"]))
    shared_ids = {image_id for image_id, _ in same}
    other_bytes = (set(index_a["image_id"]) & set(index_b["image_id"])) - shared_ids
    if other_bytes:
        print(printable(f"compare: {len(other_bytes)} image id(s) of {run_a.path} name other bytes in {run_b.path} "
                        f"(e.g. {sorted(other_bytes)[0]}): not compared"), file=sys.stderr)
    means, labels = [], []
    for label in label_names:
        rows_a, rows_b = index_a[index_a["label"] == label], index_b[index_b["label"] == label]
        shared = sorted((set(rows_a["image_id"]) & set(rows_b["image_id"])) & shared_ids)
        sa, sb = rows_a[rows_a["image_id"].isin(shared)], rows_b[rows_b["image_id"].isin(shared)]
        means.append({"label": label, "n_a": len(rows_a), "mean_a": _fmt(rows_a["mean"].mean() if len(rows_a) else None),
                      "n_b": len(rows_b), "mean_b": _fmt(rows_b["mean"].mean() if len(rows_b) else None),
                      "n_shared": len(shared), "shared_a": _fmt(sa["mean"].mean() if len(sa) else None),
                      "shared_b": _fmt(sb["mean"].mean() if len(sb) else None)})
        entry = {"name": label, "examples": [], "patches": []}
        for image_id in shared[:examples]:
            map_a, map_b = run_a.typicality_map(image_id), run_b.typicality_map(image_id)
            image = images_a.get(image_id, map_a.shape)
            if image is None:
                continue
            if map_b.shape != map_a.shape:  # the runs used other resolutions: show B at A's size
                map_b = np.asarray(Image.fromarray(map_b).resize((map_a.shape[1], map_a.shape[0]), Image.Resampling.BILINEAR))
            a, b = map_a.ravel().astype(np.float64), map_b.ravel().astype(np.float64)
            r = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")
            entry["examples"].append({"image_id": image_id, "image": image, "a": map_a, "b": map_b,
                                      "mean_a": _fmt(float(map_a.mean())), "mean_b": _fmt(float(map_b.mean())), "r": _fmt(r)})
        for name, run, images in (("A", run_a, images_a), ("B", run_b, images_b)):
            got, note = _top_patches(run, label, images, crops, crop_px)
            entry["patches"].append({"name": f"{name}: {run.path.name}", "crops": got, "note": note})
        labels.append(entry)
    # one scale for every overlay of the page: the two runs' maps are compared, not each to itself
    shown = [ex[side] for entry in labels for ex in entry["examples"] for side in ("a", "b")]
    scale = map_scale(shown)
    for ex in (ex for entry in labels for ex in entry["examples"]):
        image = ex["image"]
        ex.update(image=png_data_uri(image), a=png_data_uri(overlay(image, ex["a"], scale)),
                  b=png_data_uri(overlay(image, ex["b"], scale)))
    # the images left out of the page (unreadable, or changed since their run listed them): one line
    # each, recorded in their own run as problems of step compare (this page's only: fixed ones go)
    for run, images in ((run_a, images_a), (run_b, images_b)):
        problems = list(images.problems.values())
        try:
            run.report_skipped("compare", problems)
        except OSError:  # a run compare only reads may be one it cannot write (a shared reference): named only
            print_problems(problems, run.path)
    return {
        "title": f"diffmine compare: {run_a.path.name} vs {run_b.path.name}",
        "a": {"path": str(run_a.path), "model": _model_name(run_a)},
        "b": {"path": str(run_b.path), "model": _model_name(run_b)},
        "means": means, "labels": labels, "shared_count": len(shared_ids), "crop_px": crop_px, "map_px": map_px,
        "colorbar": png_data_uri(colorbar(scale)) if shown else None,
    }


def render(context: dict) -> str:
    return Environment(autoescape=True).from_string(TEMPLATE).render(**context)


def default_output(run_a: Run, run_b: Run) -> Path:
    return run_a.path / "compare" / f"vs-{run_b.path.name}.html"


def _replaceable(out: Path) -> Path:
    """``out``, refused (one line) where it holds something other than a compare page: ``--out``
    names a file of the user's, which an update of the page must not replace unasked."""
    if out.is_dir():
        raise ValueError(f"--out {out}: a folder; give the page's file name (e.g. {out / 'compare.html'})")
    if out.exists():
        with open(out, "rb") as f:
            head = f.read(4096)
        if GENERATOR.encode() not in head:
            raise ValueError(f"--out {out}: the file exists and is no page diffmine compare wrote; give another "
                             "--out or remove it")
    return out


def _identity(run: Run, name: str) -> str | None:
    return (run.lineage.get(name) or {}).get("identity")


def compare_runs(run_a: Run | str | Path, run_b: Run | str | Path, out: str | Path | None = None, **options) -> Path:
    """Write the comparison page of two runs (default: ``RUN_A/compare/vs-<RUN_B name>.html``).

    Both runs need typicality; mined patches are shown where a run has them.
    """
    run_a = run_a if isinstance(run_a, Run) else open_run(run_a)
    run_b = run_b if isinstance(run_b, Run) else open_run(run_b)
    if os.path.samefile(run_a.path, run_b.path):  # other spellings too: "R/", a link to R, a bind mount
        raise ValueError(f"--run {run_a.path} and --run {run_b.path} are the same run ({os.path.realpath(run_a.path)}): "
                         "a page of its maps and patches each beside itself; give two runs")
    context = build_context(run_a, run_b, **options)  # first: a run whose maps are out of date is refused
    if all(_identity(run_a, name) is not None and _identity(run_a, name) == _identity(run_b, name)
           for name in ("typicality", "mine")):  # a copy of the run: legitimate, but say what the page will show
        print(printable(f"compare: {run_a.path} and {run_b.path} hold the same typicality and mined patches (one "
                        "a copy of the other?): the two sides of the page will be alike"), file=sys.stderr)
    html = render(context)
    if out is not None:
        return write_text(_replaceable(Path(out)), html)
    with step_lock(run_a.path, "compare"):  # a write into run A: `diffmine clean` must see it
        return write_text(run_a.own_path(default_output(run_a, run_b)), html)


# -- command line (wired into cli.py by the lead) ------------------------------------------------


def add_parser(subparsers) -> "argparse.ArgumentParser":
    """``diffmine compare --run RUN_A --run RUN_B [--out PATH]``."""
    p = subparsers.add_parser("compare", help="two runs side by side (typicality maps, top patches, means)",
                              description="One HTML page comparing two runs over the images both scored, e.g. a "
                                          "finetuned model against the pretrained one.")
    p.add_argument("--run", action="append", required=True, type=Path, metavar="RUN",
                   help="a run directory; give exactly two different runs (A, then B)")
    p.add_argument("--out", type=Path, default=None, help="the page to write (default: RUN_A/compare/vs-<RUN_B>.html)")
    p.add_argument("--examples", type=int, default=4, help="images per label shown with both maps (default: 4)")
    p.add_argument("--crops", type=int, default=10, help="top patches per label and run (default: 10)")
    p.set_defaults(func=cmd_compare)
    return p


def cmd_compare(args) -> Path:
    if not args.run or len(args.run) != 2:
        raise RunError(f"compare needs exactly two runs (--run A --run B), got {len(args.run or [])}")
    if args.examples < 0 or args.crops < 0:
        raise ValueError(f"--examples and --crops must be >= 0, got {args.examples}, {args.crops}")
    path = compare_runs(args.run[0], args.run[1], args.out, examples=args.examples, crops=args.crops)
    print(path)
    return path


__all__ = ["compare_runs", "add_parser", "cmd_compare", "build_context", "render"]

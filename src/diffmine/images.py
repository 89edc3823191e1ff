"""Image helpers shared by the report, compare, localize, export and the notebook helpers: a
run's images at its own size, typicality heat maps on one diverging colormap, crops with their
context, boxes drawn, PNG bytes and data URIs."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image, ImageDraw

from .data import BadImage, Problem, listed_by_id, load_image
from .terminal import print_problems, shell_word

# diverging, perceptually ordered, white at 0: red = typical of the label, blue = atypical
COLORMAP = "RdBu_r"


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def png_data_uri(image: np.ndarray | bytes) -> str:
    """An inline ``data:`` URI of an (H, W[, 3]) uint8 array, or of PNG bytes (e.g. :func:`colorbar`)."""
    data = image if isinstance(image, bytes) else png_bytes(image)
    return "data:image/png;base64," + base64.b64encode(data).decode()


def map_scale(maps) -> float:
    """One colour scale for several maps: the 99th percentile of |typicality| over all their pixels
    (robust to a few extreme pixels); maps compared side by side must share it."""
    values = [np.abs(np.asarray(m, dtype=np.float32)).ravel() for m in maps]
    if not values:
        return 1.0
    return max(float(np.percentile(np.concatenate(values), 99)), 1e-12)


def heat_colours(values: np.ndarray, scale: float | None = None) -> np.ndarray:
    """(H, W) typicality -> (H, W, 3) uint8 on the diverging colormap, -scale .. +scale (default:
    the map's own 99th percentile of |values|, for a map shown alone)."""
    from matplotlib import colormaps

    scale = map_scale([values]) if scale is None else max(float(scale), 1e-12)
    v = np.clip(np.asarray(values, dtype=np.float32) / scale, -1, 1)
    return (colormaps[COLORMAP]((v + 1) / 2)[..., :3] * 255).round().astype(np.uint8)


def overlay(image: np.ndarray, values: np.ndarray, scale: float | None = None, alpha: float = 0.75) -> np.ndarray:
    """The heat map over the image, opaque in proportion to |typicality|: neutral pixels show the
    image as it is (no wash), strongly (a)typical ones the colour."""
    scale = map_scale([values]) if scale is None else max(float(scale), 1e-12)
    weight = alpha * np.clip(np.abs(values) / scale, 0, 1)[..., None]
    heat = heat_colours(values, scale).astype(np.float32)
    return np.clip((1 - weight) * image.astype(np.float32) + weight * heat, 0, 255).astype(np.uint8)


def colorbar(scale: float, label: str = "typicality T(x|c)", width: float = 5.5) -> bytes:
    """PNG of the colour legend of maps drawn with ``heat_colours(..., scale)`` (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    figure, axis = plt.subplots(figsize=(width, 0.8), dpi=100, layout="constrained")
    figure.colorbar(matplotlib.cm.ScalarMappable(Normalize(-scale, scale), COLORMAP), cax=axis,
                    orientation="horizontal", label=f"{label}: blue atypical, white 0, red typical")
    return figure_png(figure)


def figure_png(figure) -> bytes:
    """A matplotlib figure as PNG bytes, closed; no version stamp, so the same plot is the same file."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(figure)
    return buffer.getvalue()


def inside(box, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """``box`` = (x0, y0, x1, y1) clipped to an image of ``shape`` = (H, W), at least one pixel: boxes
    are read from a run's tables, which a received run may hold anything in (a box of 10^9 pixels
    would be drawn for hours)."""
    H, W = shape
    x0, y0 = min(max(int(box[0]), 0), W - 1), min(max(int(box[1]), 0), H - 1)
    return x0, y0, min(max(int(box[2]), x0 + 1), W), min(max(int(box[3]), y0 + 1), H)


def draw_boxes(image: np.ndarray, boxes, colour=(255, 200, 0), width: int = 1, scale: int = 1) -> np.ndarray:
    """(H, W, 3) -> (H*scale, W*scale, 3) with rectangles (x0, y0, x1, y1; x1/y1 exclusive) drawn."""
    canvas = Image.fromarray(image)
    if scale != 1:
        canvas = canvas.resize((canvas.width * scale, canvas.height * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for box in boxes:
        x0, y0, x1, y1 = inside(box, image.shape[:2])
        draw.rectangle([x0 * scale, y0 * scale, x1 * scale - 1, y1 * scale - 1], outline=colour, width=width)
    return np.asarray(canvas)


def crop_in_context(image: np.ndarray, box, size: int, context: float = 0.5) -> np.ndarray:
    """(size, size, 3): the patch with ``context`` of its side around it (clipped to the image),
    enlarged, the patch outlined, so one can see what it is part of."""
    H, W = image.shape[:2]
    x0, y0, x1, y1 = inside(box, (H, W))
    side = max(x1 - x0, y1 - y0)
    pad = int(round(side * context))
    cx0, cy0, cx1, cy1 = max(0, x0 - pad), max(0, y0 - pad), min(W, x1 + pad), min(H, y1 + pad)
    region = Image.fromarray(image[cy0:cy1, cx0:cx1])
    sx, sy = size / region.width, size / region.height
    region = region.resize((size, size), Image.Resampling.NEAREST)
    ImageDraw.Draw(region).rectangle([(x0 - cx0) * sx, (y0 - cy0) * sy, (x1 - cx0) * sx - 1, (y1 - cy0) * sy - 1],
                                     outline=(255, 200, 0), width=max(1, size // 48))
    return np.asarray(region)


def upscaled(array: np.ndarray, side: int) -> np.ndarray:
    """An image at least ``side`` pixels on its long side (nearest: small images stay sharp)."""
    factor = max(1, side // max(array.shape[:2]))
    if factor == 1:
        return array
    return np.asarray(Image.fromarray(array).resize((array.shape[1] * factor, array.shape[0] * factor),
                                                    Image.Resampling.NEAREST))


class RunImages:
    """A run's images at its own size (the run's resolution and resize), each decoded once, and
    only while it is the image the listing fingerprinted: the results shown beside it were made
    from those bytes (a file edited since, or one that a received run's listing names instead,
    is left out, its problem kept in ``problems`` for the caller to say)."""

    def __init__(self, run):
        dataset = run.step_config("dataset")
        images = run.images()
        self.paths = dict(zip(images["image_id"], images["path"]))
        self.listed = listed_by_id(images)
        self.resolution, self.resize = dataset["resolution"], dataset["resize"]
        self.multiple = run.width_multiple()
        self.cache: dict[str, np.ndarray | None] = {}
        self.problems: dict[str, Problem] = {}  # image_id -> why it could not be read

    def get(self, image_id: str, size: tuple[int, int] | None = None) -> np.ndarray | None:
        """(H, W, 3) uint8, resized to ``size`` = (H, W) if given; None for a bad, changed or unknown image."""
        key = f"{image_id}@{size}"
        if key not in self.cache:
            try:
                image = load_image(self.paths[image_id], self.resolution, self.resize, self.multiple,
                                   self.listed[image_id])
            except BadImage as exc:
                self.problems[image_id] = Problem(image_id, exc.path, exc.problem)
                image = None
            except KeyError:
                image = None
            if image is not None and size is not None and image.shape[:2] != tuple(size):
                image = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BICUBIC))
            self.cache[key] = image
        return self.cache[key]

    def crop_array(self, row, size: int, context: float = 0.0) -> np.ndarray | None:
        """(size, size, 3) crop of a patch row (image_id, x0, y0, x1, y1), with ``context`` around it."""
        image = self.get(row.image_id)
        if image is None:
            return None
        if context > 0:
            return crop_in_context(image, (row.x0, row.y0, row.x1, row.y1), size, context)
        x0, y0, x1, y1 = inside((row.x0, row.y0, row.x1, row.y1), image.shape[:2])
        crop = image[y0:y1, x0:x1]
        return np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.NEAREST))

    def crop(self, row, size: int) -> str | None:
        array = self.crop_array(row, size)
        return None if array is None else png_data_uri(array)


def cluster_grid(run, label: str, rank: int, n: int = 16, size: int = 96, context: float = 0.5) -> Image.Image:
    """A PIL grid of the ``n`` members of cluster ``rank`` of ``label`` nearest its centre (in context)."""
    patches = run.patches()
    if "cluster_rank" not in patches.columns:
        raise ValueError(f"{run.path}: no clusters yet; run `diffmine cluster --run {shell_word(run.path)}`")
    members = patches[(patches["label"] == label) & (patches["cluster_rank"] == rank)].sort_values("rank_in_cluster")
    if members.empty:
        raise KeyError(f"no cluster {rank} of label {label!r} in {run.path}")
    images = RunImages(run)
    crops = [c for c in (images.crop_array(r, size, context) for r in members.head(n).itertuples()) if c is not None]
    print_problems(list(images.problems.values()), run.path)  # left out of the grid: one line each
    if not crops:
        raise ValueError(f"none of the images of cluster {rank} of label {label!r} can be read (listed above)")
    columns = min(len(crops), 8)
    rows = -(-len(crops) // columns)
    grid = np.full((rows * (size + 2), columns * (size + 2), 3), 255, np.uint8)
    for i, crop in enumerate(crops):
        y, x = divmod(i, columns)
        grid[y * (size + 2):y * (size + 2) + size, x * (size + 2):x * (size + 2) + size] = crop
    return Image.fromarray(grid)


def image_view(run, image_id: str, side: int = 256, scale: float | None = None) -> Image.Image:
    """A PIL image: the source image beside its typicality overlay, the mined boxes drawn."""
    values = run.typicality_map(image_id)
    images = RunImages(run)
    image = images.get(image_id, values.shape)
    if image is None:
        problem = images.problems.get(image_id)
        raise KeyError(f"{problem.path}: {problem.problem}" if problem else f"{image_id!r}: the image cannot be read")
    patches = run.patches()
    boxes = patches.loc[patches["image_id"] == image_id, ["x0", "y0", "x1", "y1"]].to_numpy()
    factor = max(1, side // max(image.shape[:2]))
    left = draw_boxes(image, [], scale=factor)
    right = draw_boxes(overlay(image, values, scale), boxes, scale=factor, width=max(1, factor))
    return Image.fromarray(np.concatenate([left, np.full((left.shape[0], 4, 3), 255, np.uint8), right], 1))

"""Image helpers shared by the report, compare and localize: a run's images at its own size,
heat-map overlays of typicality, PNG data URIs."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from .data import BadImage, load_image


def png_data_uri(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def heat_colours(values: np.ndarray) -> np.ndarray:
    """(H, W) typicality -> (H, W, 3) uint8: red where positive, blue where negative, by the
    image's largest absolute value (robust: 99th percentile)."""
    scale = max(float(np.percentile(np.abs(values), 99)), 1e-12)
    v = np.clip(values / scale, -1, 1)
    pos, neg = np.clip(v, 0, 1), np.clip(-v, 0, 1)
    rgb = np.stack([255 * pos + 40 * (1 - pos - neg), 60 * pos * (1 - pos) + 40 * (1 - pos - neg), 255 * neg + 40 * (1 - pos - neg)], -1)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def overlay(image: np.ndarray, values: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    heat = heat_colours(values).astype(np.float32)
    return np.clip((1 - alpha) * image.astype(np.float32) + alpha * heat, 0, 255).astype(np.uint8)


class RunImages:
    """A run's images at its own size (the run's resolution and resize), each decoded once."""

    def __init__(self, run):
        dataset = run.step_config("dataset")
        images = run.images()
        self.paths = dict(zip(images["image_id"], images["path"]))
        self.resolution, self.resize = dataset["resolution"], dataset["resize"]
        self.cache: dict[str, np.ndarray | None] = {}

    def get(self, image_id: str, size: tuple[int, int] | None = None) -> np.ndarray | None:
        """(H, W, 3) uint8, resized to ``size`` = (H, W) if given; None for a bad or unknown image."""
        key = f"{image_id}@{size}"
        if key not in self.cache:
            try:
                image = load_image(self.paths[image_id], self.resolution, self.resize, 1)
            except (BadImage, KeyError):
                image = None
            if image is not None and size is not None and image.shape[:2] != tuple(size):
                image = np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.Resampling.BICUBIC))
            self.cache[key] = image
        return self.cache[key]

    def crop(self, row, size: int) -> str | None:
        image = self.get(row.image_id)
        if image is None:
            return None
        crop = image[row.y0:row.y1, row.x0:row.x1]
        return png_data_uri(np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.NEAREST)))

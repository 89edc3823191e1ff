"""The built-in dataset: labeled synthetic scenes, each label with its own planted element.

Every image is a smooth two-colour background with a few shared distractors (filled discs and
squares in random colours, the same distribution for every label) and one planted element that
only its label has. The element's pixel mask is written beside the image, so typicality can be
checked against ground truth:

    OUT/images/<label>/img_0000.png   the scene, RGB uint8, size x size
    OUT/masks/<label>/img_0000.png    255 where the planted element is, 0 elsewhere

Since the labels differ only by their element, a model that learned the labels should find its
typicality there and nowhere else.

Two variants serve the contrast and trend features (``contrast.py``, ``trends.py``):

- ``SynthConfig(guest=c)``: label c's element is also planted into ``guest_share`` of every other
  label's images (its masks under ``OUT/guest_masks/<label>/``), so that a contrast between two
  labels that both carry it must ignore it, and a contrast with c must not;
- :func:`generate_ordered`: labels ``era1``..``eraN`` in order, with one element whose share of
  the images grows over the eras, one that fades and one that stays constant (exact shares, masks
  per element under ``OUT/masks/<element>/<label>/``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

# label -> how its element is drawn. Names are made-up lands so that prompts read naturally
# ("A scene from norland.").
ELEMENTS = {
    "norland": "red_cross",
    "sudland": "blue_triangle",
    "eastland": "yellow_ring",
    "westland": "green_checker",
    "upland": "magenta_bar",
    "lowland": "cyan_diamond",
}


@dataclass
class SynthConfig:
    labels: int = 4
    per_label: int = 64
    size: int = 64
    distractors: int = 3
    element_scale: float = 1.0  # planted element size relative to the default (about 1/5 of the side)
    guest: int = -1  # index of a label whose element is also planted into other labels' images (-1: none)
    guest_share: float = 0.5  # share of every other label's images that carry the guest element
    seed: int = 0

    def __post_init__(self):
        if not 1 <= self.labels <= len(ELEMENTS):
            raise ValueError(f"labels must be in 1..{len(ELEMENTS)}, got {self.labels}")
        if not -1 <= self.guest < self.labels or not 0.0 <= self.guest_share <= 1.0:
            raise ValueError(f"guest must be -1 or a label index below {self.labels}, guest_share in [0, 1]")
        if self.per_label < 1 or self.distractors < 0:
            raise ValueError(f"per_label must be >= 1 and distractors >= 0, got {self.per_label}, {self.distractors}")
        # the element's radius reaches 7.5 px x size / 64 x element_scale; it is placed 1 px clear of the border
        radius = 7.5 * self.size / 64 * self.element_scale
        if self.size < 8 or not 0.0 < self.element_scale or not 2 * radius + 2 < self.size:
            raise ValueError(f"need size >= 8 and an element_scale > 0 whose element fits the image "
                             f"(radius {radius:.1f} px at size {self.size}), got size {self.size}, element_scale {self.element_scale}")


def _element_mask(kind: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    """Boolean mask of one element of half-size ``r`` centred at (cy, cx) on the grid (yy, xx)."""
    dy, dx = yy - cy, xx - cx
    if kind == "red_cross":
        arm = r * 0.35
        return ((np.abs(dy) <= r) & (np.abs(dx) <= arm)) | ((np.abs(dx) <= r) & (np.abs(dy) <= arm))
    if kind == "blue_triangle":
        # apex up: inside when below the apex and within the widening sides
        return (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.5)
    if kind == "yellow_ring":
        d = np.hypot(dy, dx)
        return (d <= r) & (d >= r * 0.55)
    if kind == "green_checker":
        return (np.abs(dy) <= r) & (np.abs(dx) <= r)
    if kind == "magenta_bar":
        return (np.abs(dy) <= r * 0.3) & (np.abs(dx) <= r)
    if kind == "cyan_diamond":
        return np.abs(dy) + np.abs(dx) <= r
    raise ValueError(f"unknown element kind {kind!r}")


def _element_colour(kind: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    """(H, W, 3) float colour field of the element (only read inside its mask)."""
    h, w = yy.shape
    colour = np.broadcast_to(np.array(ELEMENT_COLOURS[kind], np.float32), (h, w, 3)).copy()
    if kind == "green_checker":
        # a 2x2 checker of green and white: texture, not only colour, marks this element
        white = ((yy - cy) >= 0) ^ ((xx - cx) >= 0)
        colour[white] = (245, 245, 245)
    return colour


ELEMENT_COLOURS = {
    "red_cross": (220, 30, 30),
    "blue_triangle": (30, 60, 220),
    "yellow_ring": (240, 220, 30),
    "green_checker": (30, 170, 60),
    "magenta_bar": (210, 40, 200),
    "cyan_diamond": (40, 210, 220),
}


def element_colour_pixels(image: np.ndarray, label: str, tolerance: float = 45.0) -> np.ndarray:
    """A crude detector of ``label``'s element: (H, W) bool, pixels near its colour (max abs diff).

    Distractors have random colours, so it has false positives; averaged over images it tells
    whether a label's element is present, e.g. in a translated image.
    """
    colour = np.array(ELEMENT_COLOURS[ELEMENTS[label]], np.float32)
    return np.abs(image.astype(np.float32) - colour).max(-1) <= tolerance


def _background(rng: np.random.Generator, size: int, distractors: int, grey: bool = False):
    """A smooth two-colour background with grain and ``distractors`` discs or squares of random
    colours (``grey``: two greys). Returns the (size, size, 3) float image and the pixel grid (yy, xx)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c0, c1 = np.repeat(rng.uniform(90, 170, size=(2, 1)), 3, 1) if grey else rng.uniform(60, 190, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    ramp = ((np.cos(angle) * xx + np.sin(angle) * yy) / size + 1) / 2
    image = c0 * (1 - ramp[..., None]) + c1 * ramp[..., None]
    image += rng.normal(0, 4, size=image.shape)

    scale = size / 64
    for _ in range(distractors):
        cy, cx = rng.uniform(6 * scale, size - 6 * scale, size=2)
        r = rng.uniform(3, 6) * scale
        shape = (np.hypot(yy - cy, xx - cx) <= r) if rng.random() < 0.5 else ((np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r))
        image[shape] = rng.uniform(20, 235, size=3)
    return image, yy, xx


def _plant(image: np.ndarray, yy: np.ndarray, xx: np.ndarray, kind: str, rng: np.random.Generator,
           element_scale: float, avoid: np.ndarray | None = None) -> np.ndarray:
    """Draw one element of ``kind`` into ``image`` (in place) at a random place; returns its mask.
    With ``avoid`` (a mask), up to 20 places are tried for one that keeps clear of it."""
    size = image.shape[0]
    r = rng.uniform(5.5, 7.5) * size / 64 * element_scale
    for _ in range(20 if avoid is not None else 1):
        cy, cx = rng.uniform(r + 1, size - r - 1, size=2)
        mask = _element_mask(kind, yy, xx, cy, cx, r)
        if avoid is None or not (mask & avoid).any():
            break
    image[mask] = _element_colour(kind, yy, xx, cy, cx, r)[mask]
    return mask


def render_scene(label_index: int, rng: np.random.Generator, size: int = 64, distractors: int = 3,
                 element_scale: float = 1.0):
    """One scene of label ``label_index``.

    Returns:
        image: (size, size, 3) uint8
        mask: (size, size) bool, True on the planted element
    """
    image, yy, xx = _background(rng, size, distractors)
    mask = _plant(image, yy, xx, list(ELEMENTS.values())[label_index], rng, element_scale)
    return np.clip(image, 0, 255).astype(np.uint8), mask


def _save(out: Path, sub: str, label: str, i: int, array: np.ndarray) -> None:
    path = out / sub / label / f"img_{i:04d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def generate(out: str | Path, config: SynthConfig = SynthConfig(), progress: bool = True) -> Path:
    """Write the dataset under ``out`` (images/ and masks/, guest_masks/ with a guest); returns the
    images folder.

    Deterministic: the same config gives byte-identical files.
    """
    out = Path(out)
    names = list(ELEMENTS)[: config.labels]
    jobs = [(li, i) for li in range(config.labels) for i in range(config.per_label)]
    for li, i in tqdm(jobs, desc="synthetic scenes", disable=not progress):
        # one generator per image, so any image can be regenerated alone
        rng = np.random.default_rng([config.seed, li, i])
        image, mask = render_scene(li, rng, config.size, config.distractors, config.element_scale)
        if config.guest >= 0 and li != config.guest and i < round(config.guest_share * config.per_label):
            canvas = image.astype(np.float32)
            yy, xx = np.mgrid[0:config.size, 0:config.size].astype(np.float32)
            guest = _plant(canvas, yy, xx, ELEMENTS[names[config.guest]], rng, config.element_scale, avoid=mask)
            image = canvas.astype(np.uint8)
            _save(out, "guest_masks", names[li], i, guest.astype(np.uint8) * 255)
        _save(out, "images", names[li], i, image)
        _save(out, "masks", names[li], i, mask.astype(np.uint8) * 255)
    return out / "images"


# element of the ordered set -> how it is drawn (solid, saturated shapes that a small model at 32 px
# tells apart; on grey backgrounds, so that a patch's features are its element's, not its background's)
ORDERED_ELEMENTS = {"growing": "green_checker", "fading": "cyan_diamond", "constant": "yellow_ring"}


@dataclass
class OrderedConfig:
    eras: int = 5
    per_label: int = 20
    size: int = 32
    distractors: int = 1
    low: float = 0.1  # share of the images with the growing element in the first era (the fading one's in the last)
    high: float = 0.9  # ... in the last era (the fading one's in the first)
    constant: float = 0.5  # share with the constant element in every era
    element_scale: float = 1.3
    # images of an extra label ``control`` (not an era; leave it out of ``trends --order``) that
    # carry the growing and fading elements at their mean share over the eras and never the
    # constant one. Without it the constant element is as common under every label as in the whole
    # set, so its typicality is zero in expectation and it is mined only through the model's
    # errors; against this reference it is typical of every era, and the others keep their shares
    control: int = 0
    seed: int = 0


def ordered_shares(config: OrderedConfig) -> dict[str, np.ndarray]:
    """Element -> (eras,) share of each era's images that carry it."""
    growing = np.linspace(config.low, config.high, config.eras)
    return {"growing": growing, "fading": growing[::-1].copy(), "constant": np.full(config.eras, config.constant)}


def generate_ordered(out: str | Path, config: OrderedConfig = OrderedConfig(), progress: bool = True) -> Path:
    """Labels ``era1``..``eraN``; each element is in exactly ``round(share * per_label)`` images of
    an era (a seeded choice), so the true prevalence is known. Writes OUT/images/<era>/,
    OUT/masks/<element>/<era>/ (for the images that carry it), and ``config.control`` images of
    the label ``control`` (see :class:`OrderedConfig`); returns the images folder. The eras'
    images do not depend on ``control``."""
    if config.eras < 2 or config.per_label < 1 or config.control < 0:
        raise ValueError("need eras >= 2, per_label >= 1 and control >= 0")
    out = Path(out)
    shares = ordered_shares(config)
    # the eras, then the control label, each a group of images with its shares (the group's index
    # seeds its choices, so the eras do not depend on the control)
    groups = [(f"era{e + 1}", config.per_label, {name: shares[name][e] for name in ORDERED_ELEMENTS})
              for e in range(config.eras)]
    if config.control:
        groups.append(("control", config.control, {name: 0.0 if name == "constant" else float(shares[name].mean())
                                                   for name in ORDERED_ELEMENTS}))
    jobs, carriers = [], {}
    for g, (label, count, share) in enumerate(groups):
        for n, name in enumerate(ORDERED_ELEMENTS):
            chosen = np.random.default_rng([config.seed, g, n, 1]).permutation(count)
            carriers[g, name] = set(chosen[: round(share[name] * count)].tolist())
        jobs += [(g, label, i) for i in range(count)]
    for g, label, i in tqdm(jobs, desc="ordered scenes", disable=not progress):
        rng = np.random.default_rng([config.seed, g, i])
        image, yy, xx = _background(rng, config.size, config.distractors, grey=True)
        taken = np.zeros(image.shape[:2], bool)
        for name, kind in ORDERED_ELEMENTS.items():
            if i in carriers[g, name]:
                mask = _plant(image, yy, xx, kind, rng, config.element_scale, avoid=taken)
                taken |= mask
                _save(out, f"masks/{name}", label, i, mask.astype(np.uint8) * 255)
        _save(out, "images", label, i, np.clip(image, 0, 255).astype(np.uint8))
    return out / "images"

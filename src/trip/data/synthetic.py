"""Synthetic multi-domain shape images (photo / cartoon / sketch / painting) and a caption corpus.

Images are drawn at 4x the target size with Pillow and downsampled with LANCZOS. Everything is
deterministic given a numpy Generator, so the data set on disk is a pure function of the seed.
"""

from __future__ import annotations

import colorsys
import json
import os
import shutil
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from trip.errors import cannot_write

GENERATOR_VERSION = 3
CLASSES = ("circle", "square", "triangle", "star", "cross", "heart")
DOMAINS = ("photo", "cartoon", "sketch", "painting")
HUES = {"red": 0.0, "orange": 0.07, "yellow": 0.15, "green": 0.33, "blue": 0.6, "purple": 0.77, "pink": 0.9}
_SS = 4  # supersampling factor

Colour = np.ndarray  # float RGB in [0, 1], shape (3,)


def _unit_outline(name: str) -> np.ndarray:
    """Closed outline of a class as (k, 2) points within [-1, 1] (y points down)."""
    t = np.linspace(0.0, 2 * np.pi, 64, endpoint=False)
    if name == "circle":
        return np.stack([np.cos(t), np.sin(t)], 1)
    if name == "square":
        return 0.85 * np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float)
    if name in ("triangle", "star"):
        k = 3 if name == "triangle" else 10
        a = -np.pi / 2 + 2 * np.pi * np.arange(k) / k
        r = np.ones(k) if k == 3 else np.where(np.arange(k) % 2 == 0, 1.0, 0.42)
        return np.stack([r * np.cos(a), r * np.sin(a) + (0.2 if k == 3 else 0.05)], 1)
    if name == "cross":
        w = 0.34
        return np.array([(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w),
                         (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)])
    if name == "heart":
        y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
        xy = np.stack([16 * np.sin(t) ** 3, 2.5 - y], 1)
        return xy / np.abs(xy).max()
    raise ValueError(f"unknown class {name!r}")


_OUTLINES = {c: _unit_outline(c) for c in CLASSES}


def _hsv(h: float, s: float, v: float) -> Colour:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, float(np.clip(s, 0, 1)), float(np.clip(v, 0, 1))))


def _lum(rgb: Colour) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def _contrasting(obj: Colour, sample: Callable[[], Colour], gap: float = 0.25) -> Colour:
    """Sample a background colour whose luminance differs from the object's by at least ``gap``."""
    for _ in range(30):
        bg = sample()
        if abs(_lum(bg) - _lum(obj)) >= gap:
            return bg
    return np.full(3, 0.15 if _lum(obj) > 0.5 else 0.9)


def _densify(pts: np.ndarray, step: float) -> np.ndarray:
    """Resample a closed polygon so consecutive points are about ``step`` pixels apart."""
    out = []
    for p, q in zip(pts, np.roll(pts, -1, 0), strict=True):
        m = max(1, int(np.ceil(np.linalg.norm(q - p) / step)))
        out.append(p + (q - p) * np.arange(m)[:, None] / m)
    return np.concatenate(out)


def _mask(pts: np.ndarray, n: int) -> np.ndarray:
    im = Image.new("L", (n, n), 0)
    ImageDraw.Draw(im).polygon([tuple(p) for p in pts], fill=255)
    return np.asarray(im, np.float32) / 255.0


def _blur(a: np.ndarray, radius: float) -> np.ndarray:
    im = Image.fromarray(np.uint8(np.clip(a, 0, 1) * 255))
    return np.asarray(im.filter(ImageFilter.GaussianBlur(radius)), np.float32) / 255.0


def _noise(rng: np.random.Generator, n: int, cells: int, std: float, chroma: float = 0.3) -> np.ndarray:
    """Smooth (n, n, 3) noise: a coarse random grid, mostly grey with some colour, upsampled bicubically."""
    g = rng.normal(0, 1, (cells, cells, 1)) + chroma * rng.normal(0, 1, (cells, cells, 3))
    g = g.astype(np.float32)
    up = [Image.fromarray(g[..., k]).resize((n, n), Image.Resampling.BICUBIC) for k in range(3)]
    return np.stack([np.asarray(u) for u in up], -1) * (std / np.sqrt(1 + chroma**2))


def _strokes(img: Image.Image, rng: np.random.Generator, base: Colour, count: int, jitter: float) -> None:
    """Paint short, thick, colour-jittered brush strokes over ``img``."""
    n, d = img.size[0], ImageDraw.Draw(img)
    for _ in range(count):
        p = rng.uniform(-0.1, 1.1, 2) * n
        a = rng.uniform(0, np.pi) if rng.random() < 0.4 else rng.normal(np.pi / 4, 0.3)
        q = p + rng.uniform(0.1, 0.3) * n * np.array([np.cos(a), np.sin(a)])
        c = np.uint8(np.clip(base * rng.uniform(1 - jitter, 1 + jitter) + rng.normal(0, 0.03, 3), 0, 1) * 255)
        d.line([tuple(p), tuple(q)], fill=tuple(int(x) for x in c), width=int(rng.uniform(0.05, 0.1) * n))


def _photo(pts: np.ndarray, n: int, rng: np.random.Generator, col: Colour) -> Image.Image:
    obj = _hsv(*colorsys.rgb_to_hsv(*col)[:2], rng.uniform(0.75, 0.95))
    natural = ((0.08, 0.16), (0.22, 0.4), (0.52, 0.62))
    nat = natural[rng.integers(3)]
    bg0 = _contrasting(obj, lambda: _hsv(rng.uniform(*nat), rng.uniform(0.15, 0.5), rng.uniform(0.2, 0.95)))
    bg1 = np.clip(bg0 + rng.normal(0, 0.12, 3), 0, 1)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    a = rng.uniform(0, 2 * np.pi)
    g = ((xx - 0.5) * np.cos(a) + (yy - 0.5) * np.sin(a) + 0.71)[..., None] / 1.42
    bg = bg0 * (1 - g) + bg1 * g + _noise(rng, n, 6, 0.1, chroma=0.25) + rng.normal(0, 0.04, (n, n, 3))
    shadow = _blur(_mask(pts + n * np.array([0.05, 0.06]), n), n * 0.04)[..., None]
    bg *= 1 - 0.55 * shadow
    c, r = pts.mean(0), np.abs(pts - pts.mean(0)).max()
    hx, hy = c - 0.45 * r
    dist = np.sqrt((xx * n - hx) ** 2 + (yy * n - hy) ** 2)[..., None] / (2 * r)
    shaded = obj * np.clip(1.2 - 0.75 * dist, 0.35, 1.2) + 0.35 * np.exp(-((dist / 0.18) ** 2))
    m = _blur(_mask(pts, n), 1.0)[..., None]
    out = bg * (1 - m) + shaded * m + rng.normal(0, 0.02, (n, n, 3))
    return Image.fromarray(np.uint8(np.clip(out, 0, 1) * 255))


def _cartoon(pts: np.ndarray, n: int, rng: np.random.Generator, col: Colour) -> Image.Image:
    h = colorsys.rgb_to_hsv(*col)[0] + rng.uniform(0.25, 0.75)
    bg = _hsv(h, rng.uniform(0.3, 0.55), 1.0)
    img = Image.new("RGB", (n, n), tuple(int(x) for x in np.uint8(bg * 255)))
    d = ImageDraw.Draw(img)
    d.polygon([tuple(p) for p in pts], fill=tuple(int(x) for x in np.uint8(col * 255)))
    d.line([tuple(p) for p in np.vstack([pts, pts[:1]])], fill=(0, 0, 0), width=int(0.075 * n), joint="curve")
    return img


def _blur_1d(x: np.ndarray, k: int) -> np.ndarray:
    """Circular box smoothing along axis 0 that keeps the std of white noise (wobble for sketch lines)."""
    return sum(np.roll(x, s, 0) for s in range(-k, k + 1)) / np.sqrt(2 * k + 1)


def _sketch(pts: np.ndarray, n: int, rng: np.random.Generator, col: Colour) -> Image.Image:
    """Ink outline only (``col`` is unused: sketches are grey)."""
    paper = np.array([1.0, 0.98, 0.94]) - rng.uniform(0, 0.06)
    img = Image.fromarray(np.uint8(np.clip(paper + rng.normal(0, 0.015, (n, n, 3)), 0, 1) * 255))
    d = ImageDraw.Draw(img)
    dense = _densify(pts, n / 24)
    for _ in range(2):
        wobble = _blur_1d(rng.normal(0, n * 0.012, dense.shape), 3)
        line = dense + wobble
        ink = int(rng.uniform(0.05, 0.3) * 255)
        d.line([tuple(p) for p in np.vstack([line, line[:1]])], fill=(ink, ink, ink), width=int(0.04 * n))
    return img


def _painting(pts: np.ndarray, n: int, rng: np.random.Generator, col: Colour) -> Image.Image:
    h = colorsys.rgb_to_hsv(*col)[0]
    obj = _hsv(h, rng.uniform(0.3, 0.55), rng.uniform(0.45, 0.8))
    bg = _contrasting(obj, lambda: _hsv(rng.random(), rng.uniform(0.1, 0.35), rng.uniform(0.3, 0.85)), 0.3)
    layers = []
    for base in (bg, obj):
        im = Image.new("RGB", (n, n), tuple(int(x) for x in np.uint8(base * 255)))
        _strokes(im, rng, base, 80, 0.25)
        layers.append(np.asarray(im.filter(ImageFilter.GaussianBlur(n * 0.006)), np.float32) / 255.0)
    rough = _mask(pts, n) + _noise(rng, n, 16, 0.2, chroma=0.0)[..., 0]
    m = _blur(np.clip((rough - 0.5) * 4 + 0.5, 0, 1), 1.5)[..., None]
    out = layers[0] * (1 - m) + layers[1] * m + _noise(rng, n, 24, 0.05, chroma=0.2)
    return Image.fromarray(np.uint8(np.clip(out, 0, 1) * 255))


def _plain(pts: np.ndarray, n: int, col: Colour) -> Image.Image:
    """The style-free drawing every domain shares at `shift` 0: the object's colour on a mid-grey ground."""
    img = Image.new("RGB", (n, n), (128, 128, 128))
    ImageDraw.Draw(img).polygon([tuple(p) for p in pts], fill=tuple(int(x) for x in np.uint8(col * 255)))
    return img


_STYLES = {"photo": _photo, "cartoon": _cartoon, "sketch": _sketch, "painting": _painting}


def _render(class_name: str, domain: str, rng: np.random.Generator, size: int,
            shift: float = 1.0) -> tuple[Image.Image, str]:
    if domain not in _STYLES or class_name not in _OUTLINES:
        raise ValueError(f"unknown domain/class {domain!r}/{class_name!r}")
    n = size * _SS
    colour_name = str(rng.choice(list(HUES)))
    col = _hsv(HUES[colour_name] + rng.uniform(-0.02, 0.02), rng.uniform(0.75, 1.0), rng.uniform(0.8, 1.0))
    r = rng.uniform(0.26, 0.38) * n
    a = np.deg2rad(rng.uniform(-25, 25))
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    centre = rng.uniform(r + 0.04 * n, n - r - 0.04 * n, 2)
    pts = _OUTLINES[class_name] @ rot.T * r + centre
    img = _STYLES[domain](pts, n, rng, col)
    if shift < 1:  # the same object blended towards the drawing every domain shares
        img = Image.blend(_plain(pts, n, col), img, shift)
    return img.resize((size, size), Image.Resampling.LANCZOS), colour_name


def render(class_name: str, domain: str, rng: np.random.Generator, size: int = 32, shift: float = 1.0) -> Image.Image:
    """Render one RGB ``size`` x ``size`` image of ``class_name`` in the style ``domain``, its pixels a blend of
    the style (weight ``shift``) and a style-free drawing of the same object (``1 - shift``): at 0 every domain
    is drawn alike, at 1 in its full style."""
    return _render(class_name, domain, rng, size, shift)[0]


def folder_name(images_per_class: int, seed: int, size: int = 32, shift: float = 1.0) -> str:
    """The set's folder is named by everything that decides its images."""
    name = f"synthetic-v{GENERATOR_VERSION}-n{images_per_class}-seed{seed}-{size}px"
    return name if shift == 1 else f"{name}-shift{shift:g}"


def write_domains(root: Path, images_per_class: int, seed: int, size: int = 32, shift: float = 1.0) -> Path:
    """Write ``<root>/<folder_name>/<domain>/<class>/<domain>_<class>_<i:04d>.png`` and return that folder.

    The set is drawn into a temporary folder beside it and renamed into place, so concurrent runs never see half
    a set, and the loser of a race uses the winner's folder. A folder whose files differ from the list drawn
    (`IMAGES_FILE`: an image deleted, added or resized by hand) is drawn again, never used shrunk. A full or
    read-only disk is one TripError naming the folder; nothing is left half-written."""
    root = Path(root)
    out = root / folder_name(images_per_class, seed, size, shift)
    manifest = {"generator_version": GENERATOR_VERSION, "seed": seed, "size": size, "shift": shift,
                "images_per_class": images_per_class, "classes": list(CLASSES), "domains": list(DOMAINS)}
    if _complete(out, manifest):
        return out
    if _manifest(out) == manifest:
        print(f"note: the synthetic data set {out} differs from the images drawn into it (one deleted, added or "
              f"changed in size); drawing it again", file=sys.stderr)
    tmp = root / f".{out.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        root.mkdir(parents=True, exist_ok=True)
        _draw_domains(tmp, images_per_class, seed, size, shift)
        (tmp / IMAGES_FILE).write_text("".join(line + "\n" for line in _listing(tmp)))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if out.exists() and not _complete(out, manifest):  # not made by this function: edited or cut short by hand
            shutil.rmtree(out)
        try:
            os.rename(tmp, out)
        except OSError:  # another process renamed its copy into place first
            if not _complete(out, manifest):
                raise
    except OSError as err:
        size_bound = len(DOMAINS) * len(CLASSES) * images_per_class * size * size * 3  # uncompressed pixels
        raise cannot_write(out, err, "the synthetic data set", size=size_bound) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


IMAGES_FILE = "images.txt"  # every image file of a drawn set and its size: what `_complete` compares


def _complete(folder: Path, manifest: dict) -> bool:
    try:
        return _manifest(folder) == manifest and (folder / IMAGES_FILE).read_text().splitlines() == _listing(folder)
    except OSError:
        return False


def _listing(folder: Path) -> list[str]:
    """`<domain>/<class>/<file> <size>` of every file in the set's domain folders, sorted."""
    return sorted(f"{p.relative_to(folder).as_posix()} {p.stat().st_size}" for d in DOMAINS
                  for p in (folder / d).rglob("*") if p.is_file())


def _manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def _draw_domains(out: Path, images_per_class: int, seed: int, size: int, shift: float) -> None:
    for di, domain in enumerate(DOMAINS):
        for ci, cls in enumerate(CLASSES):
            rng = np.random.default_rng([seed, di, ci])
            folder = out / domain / cls
            folder.mkdir(parents=True)
            for i in range(images_per_class):
                render(cls, domain, rng, size, shift).save(folder / f"{domain}_{cls}_{i:04d}.png")


def in_style_order(styles) -> tuple[str, ...]:
    """`styles` in the order of DOMAINS: one name (and one cache entry) per set of styles."""
    return tuple(s for s in DOMAINS if s in styles)


_TEMPLATES = {  # colour is named rarely: it is easy to learn and would crowd out the shapes
    "photo": ("a photo of a {c}", "a photo of the {c}", "a photo of a {c} with a soft shadow",
              "a photo of {ac} {col} {c}", "a close-up photo of a {c}"),
    "cartoon": ("a cartoon {c}", "a cartoon of the {c}", "a drawing of a {c} in cartoon style",
                "{ac} {col} cartoon {c}", "a cartoon of a {c}"),
    "sketch": ("a sketch of a {c}", "a pencil sketch of a {c}", "a line drawing of a {c}",
               "a black and white sketch of the {c}", "a rough sketch of a {c}"),
    "painting": ("a painting of a {c}", "an oil painting of a {c}", "{ac} {col} {c} in a painting",
                 "a painting of the {c} with brush strokes", "a watercolor painting of a {c}"),
}
_PLAIN = ("{c}", "a {c}", "a picture of a {c}", "an image of the {c}")


_FILLER = ("there", "is", "here", "we", "see", "an", "image", "showing", "one", "small", "large", "simple", "picture",
           "object", "shape", "centered", "clear", "nice", "this", "little", "big", "drawn", "made", "with", "care")


def _caption(rng: np.random.Generator, cls: str, domain: str, colour: str) -> str:
    templates = _PLAIN if rng.random() < 0.2 else _TEMPLATES[domain]
    t = templates[rng.integers(len(templates))]
    caption = t.format(c=cls, col=colour, ac="an" if colour[0] in "aeiou" else "a")
    if rng.random() < 0.5:  # long captions, as on the web: the class word lands at many positions
        caption = " ".join(rng.choice(_FILLER, size=int(rng.integers(3, 24)))) + " " + caption
    return caption


def caption_corpus(num_images: int, seed: int, size: int = 32,
                   styles: tuple[str, ...] = DOMAINS) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Pretraining corpus of ``styles`` (seed stream disjoint from ``write_domains``): images, captions, class
    labels, cycling through the classes and, block by block, the styles."""
    images = np.empty((num_images, size, size, 3), np.uint8)
    labels = np.empty(num_images, np.int64)
    captions: list[str] = []
    for i in range(num_images):
        ci, style = i % len(CLASSES), styles[(i // len(CLASSES)) % len(styles)]
        rng = np.random.default_rng([seed, 10_000 + i])
        img, colour = _render(CLASSES[ci], style, rng, size)
        images[i], labels[i] = np.asarray(img), ci
        captions.append(_caption(rng, CLASSES[ci], style, colour))
    return images, captions, labels

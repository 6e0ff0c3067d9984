"""Find images that cannot be decoded (corrupt, truncated, or not an image at all) before anything uses them.

Each file is opened with PIL and fully decoded (`load()`), then converted to RGB, exactly as the frozen
feature pass reads it, so a file that passes here cannot fail there."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from trip.progress import progress

_SERIAL_BELOW = 256  # fewer images than this: no thread pool


def image_problem(path: Path) -> str | None:
    """None if the image decodes, else the reason it does not."""
    try:
        with Image.open(path) as image:
            image.load()
            image.convert("RGB")
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        return f"{type(err).__name__}: {err}".replace(str(path), path.name)
    return None


def find_unreadable(root: Path, paths: list[str], desc: str = "checking images") -> dict[str, str]:
    """Relative path -> reason, for every image under `root` that does not decode. Decoding releases the
    GIL, so threads scale on the cores there are."""
    if len(paths) < _SERIAL_BELOW:
        problems = [image_problem(root / p) for p in paths]
    else:
        workers = min(16, os.cpu_count() or 1)
        with ThreadPoolExecutor(workers) as pool:
            results = pool.map(image_problem, (root / p for p in paths), chunksize=64)
            problems = list(progress(results, total=len(paths), desc=desc, unit="images"))
    return {p: why for p, why in zip(paths, problems) if why is not None}

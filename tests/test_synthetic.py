"""Tests for the synthetic multi-domain shape data set and caption corpus."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trip.data.synthetic import CLASSES, DOMAINS, caption_corpus, render, write_domains

N_PER_CLASS = 10  # per (domain, class) for the statistical tests
CHANCE = 1 / len(CLASSES)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def _grey(x: np.ndarray) -> np.ndarray:
    return x @ np.array([0.299, 0.587, 0.114], np.float32)


@pytest.fixture(scope="module")
def samples() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Float images in [0, 1] and labels, per domain."""
    out = {}
    for di, d in enumerate(DOMAINS):
        xs, ys = [], []
        for ci, c in enumerate(CLASSES):
            rng = np.random.default_rng([123, di, ci])
            xs += [np.asarray(render(c, d, rng), np.float32) / 255 for _ in range(N_PER_CLASS)]
            ys += [ci] * N_PER_CLASS
        out[d] = (np.stack(xs), np.array(ys))
    return out


def test_render_basic_and_deterministic() -> None:
    for d, c in itertools.product(DOMAINS, CLASSES):
        a = render(c, d, np.random.default_rng(5))
        b = render(c, d, np.random.default_rng(5))
        assert a.mode == "RGB" and a.size == (32, 32)
        assert a.tobytes() == b.tobytes()
        assert a.tobytes() != render(c, d, np.random.default_rng(6)).tobytes()
    assert render("star", "photo", np.random.default_rng(0), size=48).size == (48, 48)
    with pytest.raises(ValueError):
        render("dragon", "photo", np.random.default_rng(0))
    with pytest.raises(ValueError):
        render("star", "xray", np.random.default_rng(0))


def test_write_domains_layout_and_determinism(tmp_path: Path) -> None:
    out = write_domains(tmp_path / "a", images_per_class=2, seed=0)
    assert out == tmp_path / "a" / "synthetic-v3-n2-seed0-32px"
    files = sorted(out.rglob("*.png"))
    assert len(files) == len(DOMAINS) * len(CLASSES) * 2
    for d, c, i in itertools.product(DOMAINS, CLASSES, range(2)):
        img = Image.open(out / d / c / f"{d}_{c}_{i:04d}.png")
        assert img.mode == "RGB" and img.size == (32, 32)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["images_per_class"] == 2 and manifest["size"] == 32
    assert manifest["classes"] == list(CLASSES) and manifest["domains"] == list(DOMAINS)

    same = write_domains(tmp_path / "b", images_per_class=2, seed=0)
    assert _tree(out) == _tree(same)
    other = _tree(write_domains(tmp_path / "c", images_per_class=2, seed=1))
    assert all(v != other[k] for k, v in _tree(out).items())
    # Per-(domain, class) streams: the first images do not depend on how many are written.
    more = _tree(write_domains(tmp_path / "d", images_per_class=3, seed=0))
    assert all(more[k] == v for k, v in _tree(out).items())


def test_write_domains_idempotent_and_keyed_by_settings(tmp_path: Path) -> None:
    out = write_domains(tmp_path, images_per_class=2, seed=0)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert write_domains(tmp_path, images_per_class=2, seed=0) == out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == mtimes

    one = write_domains(tmp_path, images_per_class=1, seed=0)
    assert one != out and {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == mtimes
    files = sorted(one.rglob("*.png"))
    assert len(files) == len(DOMAINS) * len(CLASSES)
    assert all(f.name.endswith("_0000.png") for f in files)
    assert json.loads((one / "manifest.json").read_text())["images_per_class"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_write_domains_redraws_a_folder_edited_by_hand(tmp_path: Path) -> None:
    out = write_domains(tmp_path, images_per_class=1, seed=0)
    (out / "manifest.json").unlink()
    (out / "photo" / "star" / "stale.png").write_bytes(b"x")
    assert write_domains(tmp_path, images_per_class=1, seed=0) == out
    assert not (out / "photo" / "star" / "stale.png").exists()
    assert len(list(out.rglob("*.png"))) == len(DOMAINS) * len(CLASSES)


def test_caption_corpus() -> None:
    n = 2 * len(CLASSES) * len(DOMAINS)
    images, captions, labels = caption_corpus(n, seed=0)
    assert images.shape == (n, 32, 32, 3) and images.dtype == np.uint8
    assert len(captions) == n and labels.shape == (n,)
    assert np.bincount(labels, minlength=len(CLASSES)).tolist() == [n // len(CLASSES)] * len(CLASSES)
    for cap, lab in zip(captions, labels, strict=True):
        assert CLASSES[lab] in cap.split()
    style_words = ("photo", "cartoon", "sketch", "drawing", "painting")
    assert sum(any(w in c for w in style_words) for c in captions) > n // 2
    assert len(set(captions)) > n // 3

    images2, captions2, labels2 = caption_corpus(n, seed=0)
    assert np.array_equal(images, images2) and captions == captions2 and np.array_equal(labels, labels2)
    images3, _, _ = caption_corpus(n, seed=1)
    assert not np.array_equal(images, images3)


def test_caption_corpus_disjoint_from_domains(tmp_path: Path) -> None:
    out = write_domains(tmp_path, images_per_class=2, seed=0)
    on_disk = {hashlib.sha1(np.asarray(Image.open(p)).tobytes()).digest() for p in out.rglob("*.png")}
    images, _, _ = caption_corpus(48, seed=0)
    assert not on_disk & {hashlib.sha1(x.tobytes()).digest() for x in images}


def test_object_background_contrast(samples: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    for d, (x, _) in samples.items():
        assert _grey(x).std(axis=(1, 2)).min() > 0.06, d


def _style_features(x: np.ndarray) -> np.ndarray:
    """Mean saturation, near-white fraction, edge density (|Laplacian|), near-black fraction."""
    mx, mn = x.max(-1), x.min(-1)
    g = _grey(x)
    lap = np.abs(4 * g[:, 1:-1, 1:-1] - g[:, :-2, 1:-1] - g[:, 2:, 1:-1] - g[:, 1:-1, :-2] - g[:, 1:-1, 2:])
    sat = (mx - mn) / (mx + 1e-6)
    return np.stack([sat.mean((1, 2)), (g > 0.85).mean((1, 2)), lap.mean((1, 2)), (g < 0.15).mean((1, 2))], 1)


def test_styles_clearly_differ(samples: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    f = {d: _style_features(x) for d, (x, _) in samples.items()}
    mean = {d: v.mean(0) for d, v in f.items()}
    # Every pair of domains is separated by > 2.5 pooled standard deviations in some statistic.
    for a, b in itertools.combinations(DOMAINS, 2):
        sep = np.abs(mean[a] - mean[b]) / np.sqrt((f[a].var(0) + f[b].var(0)) / 2)
        assert sep.max() > 2.5, (a, b, sep)
    sat, white, edges = ({d: m[k] for d, m in mean.items()} for k in range(3))
    assert sat["sketch"] < 0.15 < sat["painting"] < 0.8 * sat["cartoon"]  # sketch grey, painting muted
    assert white["sketch"] > 0.6 > max(white[d] for d in DOMAINS if d != "sketch")  # paper background
    assert edges["photo"] < 0.7 * min(edges[d] for d in DOMAINS if d != "photo")  # smooth shading


def _edge_spectrum(x: np.ndarray) -> np.ndarray:
    """Translation-invariant shape descriptor: log |FFT| of the grey-level edge map (low frequencies)."""
    g = _grey(x)
    e = np.abs(np.diff(g, axis=2))[:, :-1] + np.abs(np.diff(g, axis=1))[:, :, :-1]
    f = np.log1p(np.abs(np.fft.fft2(e))[:, :12, :12].reshape(len(x), -1))
    return f - f.mean(1, keepdims=True)


def test_classes_transfer_across_domains(samples: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Nearest-centroid on edge spectra, trained on three domains, beats chance on the held-out one."""
    feats = {d: (_edge_spectrum(x), y) for d, (x, y) in samples.items()}
    acc = {}
    for test in DOMAINS:
        xtr = np.concatenate([feats[d][0] for d in DOMAINS if d != test])
        ytr = np.concatenate([feats[d][1] for d in DOMAINS if d != test])
        centroids = np.stack([xtr[ytr == k].mean(0) for k in range(len(CLASSES))])
        xte, yte = feats[test]
        pred = ((xte[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
        acc[test] = (pred == yte).mean()
    assert acc["sketch"] > 2 * CHANCE and acc["cartoon"] > 2 * CHANCE, acc
    assert min(acc.values()) > 1.2 * CHANCE, acc


def _style_spread(shift: float) -> float:
    """How far the four styles' mean images lie apart (mean pairwise L2 of per-domain mean pixel statistics)."""
    stats = []
    for di, d in enumerate(DOMAINS):
        rng = np.random.default_rng([7, di])
        x = np.stack([np.asarray(render(CLASSES[i % len(CLASSES)], d, rng, shift=shift), np.float32) / 255
                      for i in range(12)])
        stats.append(_style_features(x).mean(0))
    return float(np.mean([np.linalg.norm(a - b) for a, b in itertools.combinations(stats, 2)]))


def test_shift_moves_the_styles_apart_and_zero_draws_every_domain_alike() -> None:
    rng = lambda d: np.random.default_rng([3, DOMAINS.index(d)])  # noqa: E731
    plain = {d: np.asarray(render("star", d, rng(d), shift=0.0)) for d in DOMAINS}
    same_object = [np.asarray(render("star", d, np.random.default_rng([3, 0]), shift=0.0)) for d in DOMAINS]
    assert all(np.array_equal(same_object[0], x) for x in same_object)  # the style leaves no trace at 0
    assert len({x.tobytes() for x in plain.values()}) == len(DOMAINS)  # different objects, one style
    spreads = [_style_spread(s) for s in (0.0, 0.5, 1.0)]
    assert spreads[0] < 0.2 * spreads[1] and spreads[1] < spreads[2], spreads  # at 0: sampling noise only
    full = np.asarray(render("star", "sketch", np.random.default_rng([5]), shift=1.0))
    assert np.array_equal(full, np.asarray(render("star", "sketch", np.random.default_rng([5]))))


def test_the_shift_names_the_folder_and_the_manifest(tmp_path: Path) -> None:
    full = write_domains(tmp_path, images_per_class=2, seed=0)
    half = write_domains(tmp_path, images_per_class=2, seed=0, shift=0.5)
    assert full != half and half.name.endswith("-shift0.5") and "shift" not in full.name
    assert json.loads((half / "manifest.json").read_text())["shift"] == 0.5
    assert _tree(full) != _tree(half)


def test_a_corpus_of_some_styles_holds_only_those() -> None:
    _, captions, labels = caption_corpus(24, seed=0, size=16, styles=("photo", "painting"))
    assert list(labels) == [i % len(CLASSES) for i in range(24)]
    assert not any("sketch" in c or "cartoon" in c for c in captions)
    assert any("painting" in c for c in captions) and any("photo" in c for c in captions)

"""Routing maps, run figures and `trip report`, on a small finished run (tiny random CLIP, synthetic data)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trip import expert_usage, routing, viz
from trip.cli import main
from trip.config import TripCfg, dump_config, parse_config
from trip.data.datasets import get_dataset
from trip.experiment import prepare, run_experiment
from trip.report import markdown_to_html

FIGURES = ("accuracy.png", "train_loss.png", "expert_usage.png", "communication.png")


def _cfg(name: str, methods: list[dict], targets: list[str], rounds: int):
    return parse_config({
        "name": name, "seeds": [0], "device": "cpu",
        "backbone": {"name": "tiny", "pretrained": None},
        "data": {"name": "synthetic", "images_per_class": 4, "targets": targets},
        "train": {"rounds": rounds, "batch_size": 16},
        "methods": methods,
    })


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> dict:
    """Two finished runs: promptfl + trip (the one with figures and expert usage), and zeroshot + trip-lite."""
    root = tmp_path_factory.mktemp("runs")
    cfg = _cfg("small", [{"name": "promptfl", "n_ctx": 2}, {"name": "trip", "n_ctx": 2, "teacher": "single"}],
               ["photo", "sketch"], 2)
    run_experiment(cfg, root / "run-a")
    workspace = prepare(cfg)
    expert_usage.write(workspace, root / "run-a")
    figures = viz.write_run_figures(root / "run-a")
    other = _cfg("other", [{"name": "zeroshot", "templates": "single"}, {"name": "trip-lite", "teacher": "single"}],
                 ["photo"], 1)
    run_experiment(other, root / "run-b")
    return {"root": root, "cfg": cfg, "workspace": workspace, "figures": figures}


def _halves(size: int = 64) -> Image.Image:
    """Left half: red with black horizontal stripes; right half: blue-green noise."""
    rng = np.random.default_rng(0)
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    half = size // 2
    pixels[:, :half] = (220, 40, 30)
    pixels[::4, :half] = 0
    pixels[:, half:] = rng.integers(0, 255, (size, size - half, 3)) * np.array([0.1, 0.6, 1.0])
    return Image.fromarray(pixels)


def test_run_figures_decode_and_are_not_blank(finished):
    assert sorted(p.name for p in finished["figures"]) == sorted(FIGURES)
    for path in finished["figures"]:
        with Image.open(path) as image:
            image.load()
            assert image.width >= 500 and image.height >= 300
            assert np.asarray(image.convert("L"), dtype=np.float32).std() > 10


def test_expert_usage_sums_to_one_per_domain(finished):
    usage = json.loads((finished["root"] / "run-a" / expert_usage.EXPERT_USAGE_FILE).read_text())
    assert list(usage["methods"]) == ["trip"]  # promptfl does not route
    trip = usage["methods"]["trip"]
    assert trip["phases"]["train"]["capacity"] == 1.0 and trip["phases"]["infer"]["capacity"] == 2.0
    for phase in trip["phases"].values():
        assert set(phase["domains"]) == {"photo", "cartoon", "sketch", "painting"}
        for d in phase["domains"].values():
            assert d["images"] == 24 and len(d["mean_weight"]) == trip["num_experts"]
            assert sum(d["mean_weight"]) == pytest.approx(1) and sum(d["argmax_share"]) == pytest.approx(1)
            assert 0 <= d["redundancy"] <= 1 and len(d["redundancy_pairs"]) == trip["num_experts"]
            assert d["collapsed"] == (max(d["mean_weight"]) > phase["collapse_threshold"])
    assert "## Warnings" not in (finished["root"] / "run-a" / "summary.md").read_text()  # capacity caps every expert


@pytest.mark.parametrize("assignment", ["hungarian", "greedy", "random"])
@pytest.mark.parametrize("capacity", [1.0, None])
@pytest.mark.parametrize("num_tokens", [17, 65])  # both distance code paths of the router
def test_token_experts_gives_the_router_weights(assignment, capacity, num_tokens):
    tokens = torch.randn(3, num_tokens, 16, generator=torch.Generator().manual_seed(num_tokens))
    keys = routing.static_keys(4, 16, seed=3)
    ids = torch.tensor([5, 11, 2**40])
    experts, weights = viz.token_experts(tokens, keys, capacity, image_ids=ids, seed=3, assignment=assignment)
    expected = routing.route(tokens, keys, capacity, image_ids=ids, seed=3, assignment=assignment)
    assert torch.equal(weights, expected)
    counts = torch.stack([(experts == e).sum(1) for e in range(4)], 1).float()
    assert torch.allclose(counts / (experts >= 0).sum(1, keepdim=True), weights)


def test_two_different_halves_go_to_different_experts(tiny_backbone):
    method = TripCfg(name="trip", num_experts=4)
    maps = viz.routing_maps(tiny_backbone, _halves(), "halves.png", method)
    assert [m.phase for m in maps] == ["train", "inference"]
    for rmap in maps:
        grid = rmap.experts[1:].reshape(rmap.grid, rmap.grid)
        left, right = grid[:, : rmap.grid // 2], grid[:, rmap.grid // 2:]
        assert len(set(grid[grid >= 0].tolist())) >= 2
        assert torch.mode(left[left >= 0]).values != torch.mode(right[right >= 0]).values


def test_routing_map_of_a_data_image_matches_the_cached_weights(finished):
    ws = finished["workspace"]
    trip = next(m for m in ws.methods if m.label == "trip")
    domain = ws.domains["cartoon"]
    for i in (0, 7):
        path = domain.root / domain.paths[i]
        key = viz.image_key(path, get_dataset("synthetic"))
        assert key == domain.paths[i]
        maps = viz.routing_maps(ws.backbone, Image.open(path).convert("RGB"), key, trip.cfg)
        for rmap, spec in zip(maps, (trip.route_train, trip.route_infer)):
            assert torch.allclose(rmap.weights, ws.frozen["cartoon"].routing[spec.key()][i], atol=1e-6)


def test_image_key():
    office = get_dataset("office-home")
    assert viz.image_key(Path("/x/y/holiday.jpg"), office) == "holiday.jpg"
    assert viz.image_key(Path("/d/office-home/Art/Bike/00012.jpg"), office) == "Art/Bike/00012.jpg"
    assert viz.image_key(Path("/d/OfficeHome/Real World/Bike/1.jpg"), office) == "Real_World/Bike/1.jpg"


def test_viz_routing_command(finished, tmp_path):
    config = tmp_path / "small.yaml"
    config.write_text(dump_config(finished["cfg"]))
    ws = finished["workspace"]
    data_image = ws.domains["photo"].root / ws.domains["photo"].paths[0]
    any_image = tmp_path / "halves.jpg"
    _halves(96).save(any_image)
    assert main(["viz", "routing", str(data_image), str(any_image), "--config", str(config),
                 "--out", str(tmp_path / "maps")]) == 0
    written = sorted((tmp_path / "maps").glob("*.png"))
    assert [p.name for p in written] == ["halves-routing.png", f"{data_image.stem}-routing.png"]
    for path in written:
        with Image.open(path) as image:
            assert image.width > 800 and np.asarray(image.convert("L"), dtype=np.float32).std() > 10


def test_report_of_two_runs(finished, tmp_path):
    runs = [finished["root"] / "run-a", finished["root"] / "run-b"]
    out = tmp_path / "rep" / "report.md"
    assert main(["report", *map(str, runs), "--out", str(out), "--html"]) == 0
    text = out.read_text()
    for run, method in (("run-a", "promptfl"), ("run-a", "trip"), ("run-b", "zeroshot"), ("run-b", "trip-lite")):
        assert f"| {run} | {method} |" in text
    assert (runs[1] / viz.FIGURES_DIR / "accuracy.png").is_file()  # drawn by the report where missing
    images = [line[line.index("](") + 2:-1] for line in text.splitlines() if line.startswith("![")]
    pngs = sum(len(list((run / viz.FIGURES_DIR).glob("*.png"))) for run in runs)
    assert len(images) == pngs >= 7 and all((out.parent / src).is_file() for src in images)
    page = (out.with_suffix(".html")).read_text()
    assert "<table>" in page and "<td>trip-lite</td>" in page and page.count('src="data:image/png;base64,') == pngs


def test_markdown_to_html(tmp_path):
    md = "# Title\n\nSome `code` and a < sign.\n\n| a | b |\n|---|---|\n| x | 1.5 |\n\n![missing](nowhere.png)\n"
    page = markdown_to_html(md, tmp_path)
    assert "<h1>Title</h1>" in page
    assert "<p>Some <code>code</code> and a &lt; sign.</p>" in page
    assert "<tr><th>a</th><th>b</th></tr>" in page and '<td>x</td><td class="num">1.5</td>' in page
    assert '<img src="nowhere.png" alt="missing">' in page

"""protocol: base2novel (trip.classes): a fake PACS tree, clients that train on the first ceil(7/2) = 4 classes,
base/novel/HM accuracies per held-out domain, zero-shot's novel accuracy against a plain run on the novel classes
alone, the same numbers under both engines, the tables and figures; and each method's class logits scored on a
class subset against the method built on that subset."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from trip.classes import class_split
from trip.cli import main
from trip.config import parse_config
from trip.data.benchmarks import PACS_CLASSES, PACS_DOMAINS
from trip.errors import TripError
from trip.experiment import run_experiment
from trip.methods import build_method
from trip.methods.base import Split
from trip.report import write_report
from trip.workspace import prepare

BASE, NOVEL = PACS_CLASSES[:4], PACS_CLASSES[4:]
METHODS = [{"name": "zeroshot", "templates": "single"}, {"name": "promptfl", "n_ctx": 2}]  # TRIP: the logit test


def _tree(root: Path, classes: tuple[str, ...], per_class: int = 4) -> Path:
    """<root>/pacs/<domain>/<class>/<n>.png, every image its own seeded noise (the same bytes in every tree)."""
    for d, domain in enumerate(PACS_DOMAINS):
        for cls in classes:
            folder = root / "pacs" / domain / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                rng = np.random.default_rng([d, PACS_CLASSES.index(cls), i])
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def _cfg(root: Path, **overrides) -> dict:
    return {"name": "b2n", "protocol": "base2novel", "seeds": [1, 2], "device": "cpu",
            "backbone": {"name": "tiny", "pretrained": None},
            "data": {"name": "pacs", "root": str(root), "targets": ["photo", "sketch"]},
            "train": {"rounds": 2, "batch_size": 8, "lr": 0.002}, "methods": METHODS, **overrides}


@pytest.fixture(scope="module")
def pacs(tmp_path_factory) -> Path:
    return _tree(tmp_path_factory.mktemp("pacs"), PACS_CLASSES)


@pytest.fixture(scope="module")
def b2n_run(pacs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("b2n-run")
    run_experiment(parse_config(_cfg(pacs)), out)
    return out


def test_base_is_the_first_ceil_half_of_the_canonical_order():
    cut = class_split("base2novel", PACS_CLASSES)
    assert (cut.base, cut.novel) == ((0, 1, 2, 3), (4, 5, 6))
    assert class_split("lodo", PACS_CLASSES) is None
    with pytest.raises(TripError, match="at least 2 classes"):
        class_split("base2novel", ("one",))


def test_clients_train_on_the_base_classes_only_with_few_shot(pacs):
    ws = prepare(parse_config(_cfg(pacs, data={"name": "pacs", "root": str(pacs), "shots_per_class": 2})))
    for client in ws.clients("photo", 1):
        assert client.train.classes == (0, 1, 2, 3) and set(client.train.labels.tolist()) <= {0, 1, 2, 3}
        assert max(np.bincount(client.train.labels.numpy())) <= 2  # few-shot composes: 2 per base class
        assert list(client.val.parts()) == ["base", "novel"]
        assert len(client.val.parts()["novel"]) + len(client.val.parts()["base"]) == len(client.val)
    target = ws.target("photo").parts()["novel"]
    assert target.classes == (4, 5, 6) and len(target) == 3 * 4 and set(target.labels.tolist()) == {0, 1, 2}
    lists = ws.client_lists(1, ["cartoon"])["cartoon"]
    assert all(p.split("/")[1] in BASE for p in lists["train"]) and set(lists["classes_under_shots"]) <= set(BASE)


def test_the_results_hold_base_novel_and_hm_per_held_out_domain(b2n_run):
    results = json.loads((b2n_run / "results.json").read_text())
    assert results["classes"] == {"base": list(BASE), "novel": list(NOVEL)}
    assert len(results["runs"]) == 2 * 2 * 2
    for run in results["runs"]:
        assert run["acc"] == run["acc_hm"] == statistics.harmonic_mean([run["acc_base"], run["acc_novel"]])
        assert {"acc_base_last", "acc_novel_last", "acc_hm_last", "acc_base_oracle", "acc_novel_oracle"} <= set(run)
    clients = json.loads((b2n_run / "clients.json").read_text())
    assert all(p.split("/")[1] in BASE for c in clients["1"].values() for p in c["train"])
    rounds = [json.loads(line) for line in (b2n_run / "rounds.jsonl").read_text().splitlines()]
    ev = next(r for r in rounds if r["method"] == "promptfl")["eval"]["server"]
    assert ev["val"] == ev["val_base"] and ev["val_mean"] == ev["val_base_mean"]  # selection: base classes only
    assert {"val_novel", "val_novel_mean", "val_hm", "target_base", "target_novel"} <= set(ev)


def test_zeroshot_novel_accuracy_equals_a_plain_run_on_the_novel_classes(b2n_run, tmp_path):
    novel_tree = _tree(tmp_path / "novel", NOVEL)
    plain = _cfg(novel_tree, protocol="lodo", methods=METHODS[:1],
                 data={"name": "pacs", "root": str(novel_tree), "targets": ["photo", "sketch"],
                       "class_list": "folders"})
    run_experiment(parse_config(plain), tmp_path / "plain")
    ours = json.loads((b2n_run / "results.json").read_text())["runs"]
    theirs = json.loads((tmp_path / "plain" / "results.json").read_text())["runs"]
    novel = {(r["target"], r["seed"]): r["acc_novel"] for r in ours if r["method"] == "zeroshot"}
    assert novel == {(r["target"], r["seed"]): r["acc"] for r in theirs}


def test_summary_report_and_figures_show_base_novel_and_hm(b2n_run, tmp_path):
    summary = (b2n_run / "summary.md").read_text()
    for title in ("base classes", "novel classes", "harmonic mean (HM) of base and novel"):
        assert f"## Target accuracy (%): {title}" in summary
    assert (b2n_run / "figures" / "base2novel.png").is_file()
    report = write_report([b2n_run], tmp_path / "report.md")[0].read_text()
    assert "### Data set `pacs`: novel classes" in report and "base2novel.png" in report
    runs = json.loads((b2n_run / "results.json").read_text())["runs"]
    hm = [statistics.fmean(r["acc_hm"] for r in runs if r["method"] == "promptfl" and r["seed"] == s) for s in (1, 2)]
    row = next(line for line in summary.split("## Target accuracy (%): harmonic")[1].splitlines()
               if line.startswith("| promptfl"))
    assert f"{statistics.fmean(hm):.2f} ± {statistics.stdev(hm):.2f}" in row  # the average column, over seeds


@pytest.mark.parametrize("method", [{"name": "fedapt", "n_ctx": 2}, {"name": "linear-probe"}],
                         ids=lambda m: m["name"])
def test_a_method_that_cannot_predict_novel_classes_is_refused(pacs, tmp_path, capsys, method):
    config = tmp_path / "closed.yaml"
    config.write_text(json.dumps(_cfg(pacs, methods=[{"name": "zeroshot"}, method])))
    assert main(["run", str(config), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"and {method['name']} cannot predict those" in err and "use protocol lodo" in err
    with pytest.raises(TripError, match=f"{method['name']} cannot predict those"):
        run_experiment(parse_config(_cfg(pacs, methods=[method])), tmp_path / "run")
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_the_dry_run_names_the_classes_and_counts_base_train_images(pacs, tmp_path, capsys):
    config = tmp_path / "b2n.yaml"
    config.write_text(json.dumps(_cfg(pacs)))
    assert main(["run", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "train on the 4 base classes (dog, elephant, giraffe, guitar)" in out and "3 novel ones" in out
    cartoon = next(c for c in prepare(parse_config(_cfg(pacs))).clients("photo", 1) if c.name == "cartoon")
    assert f"cartoon {len(cartoon.train)}/{len(cartoon.val)}" in out


@pytest.mark.parametrize("cfg", [{"name": "zeroshot", "templates": "single"}, {"name": "promptfl", "n_ctx": 2},
                                 {"name": "trip", "num_experts": 2, "n_ctx": 2, "routing": "image-soft"},
                                 {"name": "fedclip"}, {"name": "fedotp", "n_ctx": 2}], ids=lambda c: c["name"])
def test_scoring_a_class_subset_is_the_method_built_on_it(tiny_backbone, cfg):
    """Equal to the method built on the novel class names (exactly, but for FedCLIP, which encodes its class texts
    in one batch: its text features depend on the batch's size in the last bits); and, every method but FedOTP
    (whose Sinkhorn stops on the mean change over all the batch's classes), the full logits' novel columns up to
    float rounding."""
    same = torch.testing.assert_close if cfg["name"] == "fedclip" else _equal
    method_cfg = parse_config({"methods": [cfg]}).methods[0]
    full, novel = (build_method(method_cfg, tiny_backbone, names) for names in (PACS_CLASSES, NOVEL))
    gen = torch.Generator().manual_seed(0)
    n, e = 10, tiny_backbone.model.text_projection.shape[1]
    raw = torch.randn(n, e, generator=gen)
    inputs = {"features": F.normalize(raw, dim=-1), "norms": raw.norm(dim=-1),
              "cls": torch.randn(n, tiny_backbone.vision_width, generator=gen),
              "patches": torch.randn(n, 4, e, generator=gen)}
    split = Split(torch.arange(n) % len(PACS_CLASSES), inputs)
    params = full.init_params(3)
    params = full.target_model(params, [full.target_upload(full.init_private(3, i, 3)) for i in range(3)])
    part = split.of_classes((4, 5, 6))
    built = Split(part.labels, part.inputs)
    same(full.logits(params, part), novel.logits(params, built))
    if full.trainable:
        private = full.init_private(3, 0, 3)
        same(full.loss(full.init_params(3) | private, part), novel.loss(novel.init_params(3) | private, built))
    if cfg["name"] != "fedotp":
        every_class = full.logits(params, Split(part.labels, part.inputs))
        torch.testing.assert_close(every_class[:, 4:], full.logits(params, part))


def _equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.equal(a, b)


@pytest.mark.flower
def test_both_engines_give_the_same_base2novel_results(pacs, tmp_path):
    cfg = parse_config(_cfg(pacs, seeds=[1], data={"name": "pacs", "root": str(pacs), "targets": ["photo"]},
                            train={"rounds": 1, "batch_size": 8, "lr": 0.002},
                            methods=[METHODS[0], {"name": "fedotp", "n_ctx": 2}]))
    run_experiment(cfg, tmp_path / "inprocess")
    run_experiment(cfg, tmp_path / "flower", engine="flower")

    def without_time(lines):
        return [{k: v for k, v in rec.items() if k != "time_s"} for rec in lines]

    rounds = [without_time(map(json.loads, (tmp_path / e / "rounds.jsonl").read_text().splitlines()))
              for e in ("inprocess", "flower")]
    assert rounds[0] == rounds[1] and "target_novel" in rounds[0][-1]["eval"]["server"]
    runs = [without_time(json.loads((tmp_path / e / "results.json").read_text())["runs"])
            for e in ("inprocess", "flower")]
    assert runs[0] == runs[1] and all("acc_novel" in r for r in runs[0])

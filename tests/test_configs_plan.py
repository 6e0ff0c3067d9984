import io
from pathlib import Path

import pytest
from PIL import Image

from trip.cli import main
from trip.config import load_config, parse_config
from trip.data.datasets import DATASETS, DatasetSpec, get_dataset
from trip.errors import TripError
from trip.methods import comm_params
from trip.paper import PAPER, published
from trip.plan import make_plan
from trip.results import table_rows, write_summary

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))
PROTOCOL_CONFIGS = ("base2novel",)  # configs of another protocol than the paper's tables (docs/reproduce.md)
PAPER_CONFIGS = [c for c in CONFIGS if c.parent.name != "ablations" and not c.stem.startswith(PROTOCOL_CONFIGS)]


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (2, 2), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _fake_tree(base: Path, spec: DatasetSpec, per_class: int = 1) -> Path:
    """<base>/<data set folder>/<domain>/<class>/<n>.png with the canonical domains and classes, and split files
    (<domain>_train.txt, <domain>_test.txt: every third class's images in the test file) as DomainNet's."""
    data = _png()
    for domain in spec.domains:
        listed: dict[str, list[str]] = {"train": [], "test": []}
        for label, cls in enumerate(spec.classes):
            folder = base / spec.folder_names[0] / domain / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                (folder / f"{i}.png").write_bytes(data)
                listed["test" if label % 3 == 0 else "train"].append(f"{domain}/{cls}/{i}.png {label}\n")
        for part, lines in listed.items():
            (base / spec.folder_names[0] / f"{domain}_{part}.txt").write_text("".join(lines))
    return base


@pytest.fixture(scope="module")
def fake_roots(tmp_path_factory) -> dict[str, Path]:
    """One fake tree per registered data set that a config names, built on first use."""
    made: dict[str, Path] = {}

    def root(name: str) -> Path:
        if name not in made:
            made[name] = _fake_tree(tmp_path_factory.mktemp(name), get_dataset(name))
        return made[name]

    return root


def test_the_tables_have_their_configs():
    names = {c.relative_to(REPO / "configs").as_posix() for c in CONFIGS}
    for bench in ("pacs", "officehome", "vlcs", "domainnet"):
        assert {f"{bench}/{m}.yaml" for m in ("trip", "trip-lite", "promptfl", "fedclip", "zeroshot",
                                                      "linear-probe")} <= names
        assert {f"{bench}/multidomain-{m}.yaml" for m in ("trip", "promptfl", "fedotp", "zeroshot",
                                                          "linear-probe")} <= names
        assert all(load_config(REPO / "configs" / n).protocol == "multidomain" for n in names
                   if n.startswith(f"{bench}/multidomain-"))
    assert load_config(REPO / "configs/domainnet/multidomain-trip.yaml").data.domainnet_splits == "official"
    assert "ablations/officehome.yaml" in names
    assert {f"{bench}/base2novel.yaml" for bench in ("pacs", "officehome", "vlcs", "domainnet")} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_every_config_passes_the_dry_run(path, fake_roots, capsys):
    cfg = load_config(path)
    if cfg.data.name not in DATASETS:
        pytest.skip(f"data set {cfg.data.name!r} is not registered in trip.data.datasets yet")
    assert main(["run", str(path), "--dry-run", "--data-root", str(fake_roots(cfg.data.name))]) == 0
    out = capsys.readouterr().out
    spec = get_dataset(cfg.data.name)
    if cfg.protocol == "multidomain":  # one run per (seed, method); every domain a client, with its test split
        assert f"= {len(cfg.seeds) * len(cfg.methods)} runs; {len(spec.domains)} clients per run" in out
        assert "test images" in out
    else:
        runs = len(cfg.seeds) * len(cfg.methods) * len(spec.domains)
        assert f"= {runs} runs; {len(spec.domains) - 1} clients per run" in out
    if spec.counts_exact:
        assert "the standard release has" in out  # one image per class is far from the real counts


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_paper_configs_hold_the_paper_settings(path):
    cfg = load_config(path)
    t = cfg.train
    assert (cfg.backbone.name, cfg.backbone.pretrained, cfg.seeds, cfg.data.targets) == ("ViT-B-16", "openai", [42],
                                                                                          "all")
    assert (t.rounds, t.local_epochs, t.batch_size, t.lr, t.lr_decay) == (15, 1, 16, 5e-4, 0.8)
    assert (t.betas, t.eps, t.weight_decay) == ((0.9, 0.98), 1e-7, 0.01)
    fedapt = {"pacs": 58_880, "vlcs": 42_496, "officehome": 534_016, "domainnet": 2_828_800}[path.parent.name]
    if path.stem == "multidomain-fedapt":
        fedapt += 512  # every domain is a client: one more domain-classifier output
    classes = len(get_dataset(cfg.data.name).classes)
    want = {"trip": 65_536, "trip-lite": 1_024, "promptfl": 8_192, "fedclip": 525_312, "zeroshot": 0,
            "fedotp": 8_192, "fedapt": fedapt, "linear-probe": classes * 513}[path.stem.removeprefix("multidomain-")]
    assert all(comm_params(m, 512, 768, len(get_dataset(cfg.data.name).classes)) == want for m in cfg.methods)


def test_ablations_are_distinct_variants_of_trip():
    cfg = load_config(REPO / "configs" / "ablations" / "officehome.yaml")
    labels = [m.label for m in cfg.methods]
    assert labels == ["trip", "image-hard", "image-soft", "uniform", "random-assignment", "no-capacity", "m1",
                      "learned-router"]
    assert len({m.model_dump_json(exclude={"label"}) for m in cfg.methods}) == len(labels)


def test_paper_domains_match_the_registry():
    for (dataset, _), accs in PAPER.items():
        if dataset in DATASETS:
            assert set(accs) - {"avg"} == set(get_dataset(dataset).domains)


@pytest.fixture
def fakebench(monkeypatch, tmp_path) -> DatasetSpec:
    spec = DatasetSpec(name="fakebench", domains=("a", "b", "c"), classes=("x", "y"), folder_names=("fakebench",),
                       expected_counts={"a": 10, "b": 10, "c": 10})
    monkeypatch.setitem(DATASETS, "fakebench", spec)
    _fake_tree(tmp_path, spec, per_class=5)
    return spec


def _cfg(tmp_path, **data):
    return parse_config({"data": {"name": "fakebench", "root": str(tmp_path), **data},
                         "backbone": {"name": "tiny", "pretrained": None},
                         "seeds": [0, 1], "methods": [{"name": "trip-lite"}, {"name": "fedclip"}]})


def test_plan_counts_splits_and_params(fakebench, tmp_path):
    (tmp_path / "fakebench" / "c" / "y" / "extra.png").write_bytes(_png())
    for f in (tmp_path / "fakebench" / "b" / "y").iterdir():
        f.unlink()
    plan = make_plan(_cfg(tmp_path, targets=["a", "c"]))
    assert plan.runs == 2 * 2 * 2
    assert {d: (p.images, p.train, p.val) for d, p in plan.domains.items()} == {
        "a": (10, 8, 2), "b": (5, 4, 1), "c": (11, 8, 2)}
    assert plan.widths == (64, 64) and plan.weights == "random weights"
    assert plan.params == {"trip-lite": 2 * 1 * 64, "fedclip": 2 * (64**2 + 64)}
    assert "b: 5 images; the standard release has 10" in plan.warnings
    assert "b: 1 of 2 classes have no images" in plan.warnings


def test_plan_refuses_what_a_run_would_refuse(fakebench, tmp_path):
    with pytest.raises(TripError, match="not domains of fakebench"):
        make_plan(_cfg(tmp_path, targets=["z"]))
    (tmp_path / "fakebench" / "c" / "x").rename(tmp_path / "fakebench" / "c" / "w")
    with pytest.raises(TripError, match="class folders of .* do not match"):
        make_plan(_cfg(tmp_path))
    with pytest.raises(TripError, match="does not exist"):
        make_plan(_cfg(tmp_path / "nowhere"))
    cfg = _cfg(tmp_path)
    cfg.backbone.name = "ViT-Q-99"
    with pytest.raises(TripError, match="not an open_clip model"):
        make_plan(cfg)
    cfg.backbone.name, cfg.backbone.pretrained = "ViT-B-16", "/no/such/ViT-B-16.pt"
    with pytest.raises(TripError, match="no weights file"):
        make_plan(cfg)


def test_cli_backbone_and_data_root(fakebench, tmp_path, capsys):
    path = tmp_path / "paper.yaml"
    path.write_text("data: {name: fakebench}\nbackbone: {name: ViT-B-16, pretrained: openai}\n"
                    "methods: [{name: trip}]\n")
    assert main(["run", str(path), "--dry-run", "--data-root", str(tmp_path)]) == 0
    assert "text width 512, vision width 768" in capsys.readouterr().out
    assert main(["run", str(path), "--dry-run", "--data-root", str(tmp_path), "--backbone", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "backbone  tiny (text width 64, vision width 64)" in out and "weights   random weights" in out
    assert "8,192" in out  # TRIP's 4 x 32 tokens at text width 64
    assert main(["run", str(path), "--dry-run", "--data-root", str(tmp_path), "--backbone", "ViT-L-14"]) == 0
    out = capsys.readouterr().out
    assert "ViT-L-14 (text width 768, vision width 1024)" in out and "open_clip tag 'openai'" in out
    assert main(["run", str(path), "--dry-run", "--data-root", str(tmp_path), "--backbone", "tiny",
                 "--set", "backbone.pretrained=synthetic"]) == 0
    assert "pretrained on synthetic captions" in capsys.readouterr().out
    assert main(["run", str(path), "--dry-run"]) == 2  # no --data-root, no data.root, and TRIP_DATA unset
    assert "no data root for fakebench" in capsys.readouterr().err


def _runs(method: str, accs: dict[str, list[float]]) -> list[dict]:
    return [{"method": method, "target": t, "seed": s, "acc": a, "comm_params_per_round": 65_536}
            for t, per_seed in accs.items() for s, a in enumerate(per_seed)]


def test_summary_puts_the_paper_next_to_ours(tmp_path):
    runs = _runs("trip", {"Art": [85.0, 86.0], "Clipart": [71.0, 72.0], "Product": [93.0, 93.0],
                          "Real_World": [92.0, 90.0]})
    runs += _runs("uniform", {"Art": [80.0, 80.0], "Clipart": [70.0, 70.0], "Product": [90.0, 90.0],
                              "Real_World": [90.0, 90.0]})
    cfg = parse_config({"name": "oh", "seeds": [0, 1], "data": {"name": "office-home"},
                        "methods": [{"name": "trip"}, {"name": "trip", "label": "uniform", "routing": "uniform"}]})
    text = write_summary(tmp_path, cfg, runs)
    assert text == (tmp_path / "summary.md").read_text()
    assert "| trip | 85.50 ± 0.71 | 71.50 ± 0.71 | 93.00 ± 0.00 | 91.00 ± 1.41 | 85.25 ± 0.00 | 65,536 |" in text
    assert "| trip (paper) | 85.49 | 71.22 | 92.97 | 91.79 | 85.37 | 0.065M |" in text
    assert "| trip (ours − paper) | +0.01 | +0.28 | +0.03 | -0.79 | -0.12 |  |" in text
    assert "uniform (paper)" not in text  # an ablation is not the paper's TRIP
    assert published("office-home", "fedclip")["avg"] == 79.69


def test_paper_average_is_compared_only_over_the_paper_targets():
    _, rows = table_rows(_runs("trip-lite", {"Art": [84.0]}), "office-home")
    assert rows[1] == ["trip-lite (paper)", "84.21", "84.53", "0.001M"]
    assert rows[2] == ["trip-lite (ours − paper)", "-0.21", "—", ""]
    assert len(table_rows(_runs("trip", {"Art": [84.0]}), "pacs")[1]) == 1  # nothing published for PACS here

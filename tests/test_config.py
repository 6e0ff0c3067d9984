import pytest

from trip.config import apply_override, load_config, parse_config
from trip.errors import TripError

BASE = {"methods": [{"name": "zeroshot"}, {"name": "trip-lite"}]}


def test_defaults_follow_the_paper():
    cfg = parse_config(BASE)
    assert (cfg.train.rounds, cfg.train.batch_size, cfg.train.lr, cfg.train.lr_decay) == (15, 16, 5e-4, 0.8)
    lite = cfg.methods[1]
    assert (lite.num_experts, lite.n_ctx, lite.capacity_train, lite.capacity_infer) == (2, 1, 1.0, 2.0)
    trip = parse_config({"methods": [{"name": "trip"}]}).methods[0]
    assert (trip.num_experts, trip.n_ctx, trip.kl_weight) == (4, 32, 1.0)


def test_unknown_key_is_named():
    with pytest.raises(TripError, match=r"unknown key 'train.lrr'"):
        parse_config({**BASE, "train": {"lrr": 1}})
    with pytest.raises(TripError, match=r"unknown key 'methods.1.num_expert'"):
        parse_config({"methods": [{"name": "zeroshot"}, {"name": "trip", "num_expert": 3}]})


def test_bad_value_is_named():
    with pytest.raises(TripError, match=r"key 'train.rounds'"):
        parse_config({**BASE, "train": {"rounds": 0}})
    with pytest.raises(TripError, match=r"methods.0"):
        parse_config({"methods": [{"name": "nosuchmethod"}]})


def test_duplicate_labels_refused():
    with pytest.raises(TripError, match="distinct `label`"):
        parse_config({"methods": [{"name": "trip"}, {"name": "trip", "routing": "uniform"}]})
    parse_config({"methods": [{"name": "trip"}, {"name": "trip", "routing": "uniform", "label": "u"}]})


def test_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("methods:\n  - {name: promptfl}\n  - {name: trip}\n")
    cfg = load_config(path, ["train.rounds=3", "methods.1.n_ctx=8", "data.targets=[sketch]"])
    assert cfg.train.rounds == 3 and cfg.methods[1].n_ctx == 8 and cfg.data.targets == ["sketch"]
    with pytest.raises(TripError, match="not an index"):
        apply_override({"methods": []}, "methods.4.n_ctx=1")
    with pytest.raises(TripError, match="key=value"):
        apply_override({}, "train.rounds")


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(TripError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("methods: [\n")
    with pytest.raises(TripError, match="not valid YAML"):
        load_config(bad)


def test_dp_and_secure_aggregation_together_are_refused():
    raw = {"methods": [{"name": "promptfl"}], "federation": {
        "secure_aggregation": True, "dp": {"mode": "client", "clipping_norm": 1.0, "noise_multiplier": 0.5}}}
    with pytest.raises(TripError, match="dp and federation.secure_aggregation together"):
        parse_config(raw)

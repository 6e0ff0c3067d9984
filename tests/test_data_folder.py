import numpy as np
import pytest
from PIL import Image

from trip.data.folder import scan_domain, split_indices, subsample
from trip.errors import TripError

CLASSES = ("bird", "car", "dog")


def _tree(root, domain="A", classes=CLASSES, per_class=3):
    for c in classes:
        (root / domain / c).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / domain / c / f"{i}.png")


def test_split_is_the_official_one():
    train, val = split_indices(11, 0.2, seed=42)
    perm = np.random.RandomState(42).permutation(11)
    assert list(train) == list(perm[:8]) and list(val) == list(perm[8:10])
    assert not set(train) & set(val)
    assert len(split_indices(2427, 0.2, 42)[0]) == int(0.8 * 2427)


def test_scan_orders_by_canonical_class_and_name(tmp_path):
    _tree(tmp_path)
    dom = scan_domain(tmp_path, "A", CLASSES)
    assert dom.paths[:3] == ["A/bird/0.png", "A/bird/1.png", "A/bird/2.png"]
    assert list(dom.labels) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_missing_and_extra_class_folders_are_named(tmp_path):
    _tree(tmp_path, classes=("bird", "car", "cat"))
    with pytest.raises(TripError, match=r"missing \['dog'\], unexpected \['cat'\]"):
        scan_domain(tmp_path, "A", CLASSES)
    with pytest.raises(TripError, match="domain folder missing"):
        scan_domain(tmp_path, "B", CLASSES)


def test_subsample_is_seeded_and_sorted(tmp_path):
    _tree(tmp_path, per_class=4)
    dom = scan_domain(tmp_path, "A", CLASSES)
    a, b = subsample(dom, 5, seed=1), subsample(dom, 5, seed=1)
    assert a.paths == b.paths and len(a) == 5 and a.paths == sorted(a.paths, key=dom.paths.index)
    assert subsample(dom, None, 1) is dom

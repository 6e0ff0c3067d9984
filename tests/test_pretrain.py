"""The tiny CLIP's synthetic pretraining: the compact weights file (every tensor but the token embedding's unused
rows) loads back to exactly the trained model, a corpus of chosen styles is another model, `trip weights
pretrain-tiny` writes the file trip ships, and the shipped file is the one the default recipe names."""

from __future__ import annotations

from importlib import resources

import pytest
import torch

from trip import pretrain, safefile
from trip.cli import main
from trip.data.synthetic import DOMAINS
from trip.tinyclip import new_tiny_clip

TINY_RECIPE = {**pretrain.RECIPE, "images": 48, "steps": 3, "groups": 2}


@pytest.fixture
def tiny_recipe(monkeypatch, tmp_path):
    monkeypatch.setattr(pretrain, "RECIPE", TINY_RECIPE)
    monkeypatch.setenv("TRIP_CACHE", str(tmp_path / "cache"))
    return tmp_path


def _equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_the_compact_file_loads_back_to_the_trained_model(tiny_recipe, monkeypatch):
    trained = {}
    real = pretrain.pretrain

    def keep(model, styles):
        real(model, styles)
        trained["model"] = model

    monkeypatch.setattr(pretrain, "pretrain", keep)
    first, identity = pretrain.pretrained_tiny_clip()
    (path,) = (tiny_recipe / "cache").glob("tiny-clip-synthetic-*.safetensors")
    tensors, meta = safefile.read_tensors(path)
    rows = tensors["token_embedding.rows"]
    assert 0 < len(rows) < 2000 and "token_embedding.weight" not in tensors  # the corpus' tokens only
    init = new_tiny_clip().token_embedding.weight
    untouched = torch.ones(init.shape[0], dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(trained["model"].token_embedding.weight[untouched], init[untouched])
    monkeypatch.setattr(pretrain, "pretrain", real)
    again, identity_again = pretrain.pretrained_tiny_clip()
    assert _equal(trained["model"], first) and _equal(first, again)
    assert identity == identity_again == f"tiny:synthetic-{pretrain.recipe_key()}-{meta['sha256'][:8]}"


def test_a_corpus_of_other_styles_is_another_model(tiny_recipe):
    seen, seen_id = pretrain.pretrained_tiny_clip()
    blind, blind_id = pretrain.pretrained_tiny_clip(("photo", "cartoon", "painting"))
    assert pretrain.recipe_key(("photo", "cartoon", "painting")) in blind_id and seen_id != blind_id
    assert not _equal(seen, blind)


def test_the_command_writes_the_file_and_keeps_an_existing_one(tiny_recipe, capsys):
    folder = tiny_recipe / "assets"
    assert main(["weights", "pretrain-tiny", str(folder)]) == 0
    path = folder / pretrain.file_name(pretrain.recipe_key())
    assert f"wrote {path}" in capsys.readouterr().out
    model, _ = pretrain._load(path, pretrain.recipe_key())
    assert model is not None
    assert main(["weights", "pretrain-tiny", str(folder)]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert main(["weights", "pretrain-tiny", str(folder), "--styles", "sketch", "photo"]) == 0
    assert (folder / pretrain.file_name(pretrain.recipe_key(("photo", "sketch")))).is_file()  # canonical order


def test_the_shipped_weights_are_the_default_recipe_and_verify():
    (shipped,) = [f for f in (resources.files("trip") / "assets").iterdir() if f.name.endswith(".safetensors")]
    assert shipped.name == pretrain.file_name(pretrain.recipe_key(DOMAINS)), (
        "the recipe changed without `trip weights pretrain-tiny src/trip/assets --force` (docs/datasets.md)")
    with resources.as_file(shipped) as path:
        model, digest = pretrain._load(path, pretrain.recipe_key(DOMAINS))
    assert model is not None and len(digest) == 64

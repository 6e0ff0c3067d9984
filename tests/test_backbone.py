import pytest
import torch

from trip.backbone import load_backbone
from trip.config import BackboneCfg
from trip.errors import TripError


def test_image_path_matches_open_clip(tiny_backbone):
    pixels = torch.randn(3, 3, 32, 32)
    feats, tokens = tiny_backbone.encode_images(pixels)
    assert torch.allclose(feats, tiny_backbone.model.encode_image(pixels), atol=1e-6)
    assert tokens.shape == (3, 1 + 8 * 8, tiny_backbone.vision_width)  # CLS + 8x8 grid, before ln_post
    visual = tiny_backbone.model.visual
    pooled = visual.ln_post(tokens[:, 0]) @ visual.proj
    assert torch.allclose(pooled, feats, atol=1e-5)


def test_tiny_random_weights_are_stable(tiny_backbone):
    again = load_backbone(BackboneCfg(name="tiny", pretrained=None), torch.device("cpu"))
    for a, b in zip(tiny_backbone.model.parameters(), again.model.parameters()):
        assert torch.equal(a, b)
    assert all(not p.requires_grad for p in again.model.parameters())


def test_missing_weights_file_explains_the_fix(tmp_path):
    with pytest.raises(TripError, match="no weights file.*backbone.pretrained"):
        load_backbone(BackboneCfg(name="ViT-B-16", pretrained=str(tmp_path / "ViT-B-16.pt")), torch.device("cpu"))
    with pytest.raises(TripError, match="not an open_clip model"):
        load_backbone(BackboneCfg(name="ViT-Q-99"), torch.device("cpu"))


def test_local_checkpoint_file_loads(tmp_path):
    import open_clip

    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = open_clip.model.CLIP(embed_dim=16, vision_cfg={"image_size": 32, "patch_size": 16,
                                     "width": 32, "layers": 1, "head_width": 16},
                                     text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32,
                                               "heads": 2, "layers": 1})
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    (tmp_path / "cfg").mkdir()
    import json

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 32, "layers": 1,
                                           "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "cfg" / "test-micro.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "cfg")
    bb = load_backbone(BackboneCfg(name="test-micro", pretrained=str(path), quick_gelu=False),
                       torch.device("cpu"))
    assert torch.equal(bb.model.visual.proj, model.visual.proj)
    assert bb.identity.startswith("test-micro:")


def _images_of_every_mode(folder):
    """The seven image modes, written to disk (CMYK as TIFF: PNG has no CMYK)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (30, 45, 4), dtype=np.uint8), "RGBA")
    images = {"RGB": rgba.convert("RGB"), "L": rgba.convert("L"), "P": rgba.convert("RGB").quantize(64),
              "RGBA": rgba, "LA": rgba.convert("LA"), "CMYK": rgba.convert("CMYK"),
              "I;16": Image.fromarray(rng.integers(0, 2**16, (30, 45), dtype=np.uint16))}
    paths = {}
    for mode, image in images.items():
        paths[mode] = folder / f"{mode.replace(';', '')}.{'tif' if mode == 'CMYK' else 'png'}"
        image.save(paths[mode])
        assert Image.open(paths[mode]).mode == mode
    return paths


def test_preprocessing_equals_open_clip_for_every_image_mode(tiny_backbone, tmp_path):
    """trip's pixels (feature path and `trip viz routing`: load_image + the backbone's transform) are open_clip's
    `image_transform` of the image in its own mode, bit for bit; converting to RGB first would differ."""
    import numpy as np
    from open_clip.transform import image_transform
    from PIL import Image

    from trip.backbone import load_image
    from trip.data.folder import Domain
    from trip.features import _Images

    paths = _images_of_every_mode(tmp_path)
    official = image_transform(32, is_train=False)
    names = [p.name for p in paths.values()]
    images = _Images(Domain("d", tmp_path, names, np.zeros(len(names), dtype=np.int64)), tiny_backbone.transform())
    for i, (mode, path) in enumerate(paths.items()):
        expected = official(Image.open(path))
        assert torch.equal(images[i], expected), mode
        assert torch.equal(tiny_backbone.transform()(load_image(path)), expected), mode
        if mode in ("P", "RGBA", "LA"):  # the modes where converting first gives other pixels
            assert not torch.equal(official(Image.open(path).convert("RGB")), expected), mode


@pytest.mark.parametrize("mode", ["P", "RGBA"])
def test_routing_map_sees_the_pixels_of_the_feature_path(mode, tiny_backbone, tmp_path):
    """`trip viz routing` routes the image in its own mode exactly as the frozen cache does, and draws it."""
    from open_clip.transform import image_transform
    from PIL import Image

    from trip import routing, viz
    from trip.backbone import load_image
    from trip.config import TripCfg
    from trip.features import image_id

    path = _images_of_every_mode(tmp_path)[mode]
    method = TripCfg(name="trip", num_experts=4)
    maps = viz.routing_maps(tiny_backbone, load_image(path), path.name, method)
    _, tokens = tiny_backbone.encode_images(image_transform(32, is_train=False)(Image.open(path)).unsqueeze(0))
    keys = routing.static_keys(4, tiny_backbone.vision_width, method.key_seed)
    for rmap, run, capacity in zip(maps, ("train", "infer"), (method.capacity_train, method.capacity_infer)):
        expected = routing.route(tokens, keys, capacity, image_ids=torch.tensor([image_id(path.name)]),
                                 seed=method.key_seed, run=run, assignment=method.assignment)
        assert torch.equal(rmap.weights, expected[0])
    assert viz.routing_figure(load_image(path), maps, "t") is not None

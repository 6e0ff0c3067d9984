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

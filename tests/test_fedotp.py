"""FedOTP: its logits against the official formulas per (image, class), what travels and what stays private, the
deployed model of each target mode, kill-and-resume with the private prompts, the dry run's cost on every data set,
and the patch tokens read per batch (never the whole cache in memory)."""

from __future__ import annotations

import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from trip.checkpoint import RunCheckpoints
from trip.cli import main
from trip.config import FedOTPCfg, load_config, parse_config
from trip.data.datasets import get_dataset
from trip.experiment import prepare
from trip.federation.inprocess import run_federation
from trip.methods.base import Split
from trip.methods.fedotp import FedOTP
from trip.patchcache import PatchFile
from trip.textenc import encode_prompts_naive

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from test_configs_plan import _fake_tree  # noqa: E402

SEED, TARGET = 3, "photo"
MODES = ["global_plus_mean_local", "global_only", "source_ensemble", "global_plus_init"]
CONFIG = {"name": "fedotp", "seeds": [SEED], "device": "cpu", "backbone": {"name": "tiny", "pretrained": None},
          "data": {"name": "synthetic", "images_per_class": 3, "targets": [TARGET]},
          "train": {"rounds": 2, "batch_size": 8, "lr": 0.05},
          "methods": [{"name": "fedotp", "n_ctx": 2, "target_mode": m} for m in MODES]}


def _official_plan(sim: torch.Tensor, variant: str, gamma: float, eps: float, iters: int) -> torch.Tensor:
    """One problem sim [M, N] with the official loops (GLP_OT.py `Sinkhorn`, `entropic_COT_fast`), written
    per problem; a fixed number of iterations (tol 0), so no other problem of the batch changes when it stops."""
    m, n = sim.shape
    kernel = torch.exp(-(1 - sim) / eps)
    a, b = torch.full((m,), 1 / m), torch.full((n,), 1 / n)
    if variant == "cot":
        b = b * gamma
    u, v = torch.ones(m), torch.ones(n)
    for _ in range(iters):
        u = a / (kernel @ v)
        if variant == "cot":
            u = torch.clamp(u, max=1.0)
        v = b / (kernel.T @ u)
    return u[:, None] * kernel * v[None, :]


@pytest.mark.parametrize(("variant", "prompts"), [("cot", 2), ("sinkhorn", 2), ("cot", 1)])
def test_logits_equal_the_official_formulas_per_image_and_class(tiny_backbone, variant, prompts):
    classes = ("circle", "square", "triangle")
    cfg = FedOTPCfg(name="fedotp", n_ctx=2, ot=variant, gamma=0.7, eps=0.1, tol=0.0, max_iters=30)
    method = FedOTP(cfg, tiny_backbone, classes)
    gen = torch.Generator().manual_seed(0)
    width, dim = tiny_backbone.text_width, tiny_backbone.model.text_projection.shape[1]
    ctx = torch.randn(prompts, 2, width, generator=gen) * 0.5
    patches = torch.randn(4, 5, dim, generator=gen)  # 4 images, 5 patch tokens, unnormalised as cached
    params = {"global": ctx[0]} | ({"local": ctx[1]} if prompts == 2 else {})
    got = method.logits(params, Split(torch.zeros(4, dtype=torch.long), {"patches": patches}))

    text = F.normalize(encode_prompts_naive(tiny_backbone.model, method.tokens, ctx), dim=-1)  # [N, C, E]
    scale = tiny_backbone.model.logit_scale.exp()
    want = torch.zeros(4, len(classes))
    for b in range(4):
        for c in range(len(classes)):
            sim = F.normalize(patches[b], dim=-1) @ text[:, c].T  # [M, N]
            want[b, c] = scale * (_official_plan(sim, variant, 0.7, 0.1, 30) * sim).sum()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.std() > 0  # the classes are told apart


@pytest.fixture(scope="module")
def workspace():
    return prepare(parse_config(CONFIG))


def _run(ws, label: str, **kwargs):
    method = next(m for m in ws.methods if m.label == label)
    return method, run_federation(method, ws.clients(TARGET, SEED), ws.target(TARGET), ws.cfg.train, SEED,
                                  lambda _: None, **kwargs)


def test_labels_name_the_target_mode(workspace):
    assert [m.label for m in workspace.methods] == ["fedotp", "fedotp-global_only", "fedotp-source_ensemble",
                                                    "fedotp-global_plus_init"]
    method = workspace.methods[0]
    assert method.comm_params == 2 * 64 and method.upload_params == 2 * 64
    assert [m.upload_params for m in workspace.methods[1:]] == [0, 2 * 64, 0]
    assert method.optimizer().model_dump(exclude_none=True) == {"name": "sgd", "lr": 1e-3, "momentum": 0.9,
                                                                "weight_decay": 5e-4}


def test_only_the_global_prompt_travels_and_each_target_mode_deploys_its_model(workspace, tmp_path):
    checkpoints = RunCheckpoints(tmp_path)
    method, result = _run(workspace, "fedotp", on_round=checkpoints.save)
    privates = [p["local"] for p in checkpoints.latest().privates]
    init = method.init_private(SEED, 0, 3)["local"]
    assert all(not torch.equal(p, init) for p in privates) and not torch.equal(privates[0], privates[1])
    deployed = result.models["server"]
    assert set(deployed) == {"global", "local"}
    torch.testing.assert_close(deployed["local"], torch.stack(privates).mean(0), rtol=0, atol=0)

    _, only = _run(workspace, "fedotp-global_only")
    assert set(only.models["server"]) == {"global"}
    _, pmflt = _run(workspace, "fedotp-global_plus_init")
    assert torch.equal(pmflt.models["server"]["local"], init)  # the untrained local prompt, as PMFLT's server
    ens_method, ens = _run(workspace, "fedotp-source_ensemble")
    model = ens.models["server"]
    assert model["locals"].shape == (3, 2, 64)
    target = workspace.target(TARGET)
    each = [ens_method.logits({"global": model["global"], "local": loc}, target) for loc in model["locals"]]
    # equal up to float order (the text encoder runs 1 + K prompts at once there, 2 here)
    torch.testing.assert_close(ens_method.logits(model, target), torch.stack(each).mean(0), rtol=1e-5, atol=1e-5)


def test_kill_and_resume_equals_one_run_with_the_private_prompts(workspace, tmp_path):
    _, whole = _run(workspace, "fedotp")
    checkpoints = RunCheckpoints(tmp_path)

    def stop_after_first(state):
        checkpoints.save(state)
        raise KeyboardInterrupt  # killed right after round 0's checkpoint

    with pytest.raises(KeyboardInterrupt):
        _run(workspace, "fedotp", on_round=stop_after_first)
    state = checkpoints.latest()
    assert state.next_round == 1 and [set(p) for p in state.privates] == [{"local"}] * 3
    _, resumed = _run(workspace, "fedotp", resume=state)
    strip = [[{k: v for k, v in h.items() if k != "time_s"} for h in r.history] for r in (whole, resumed)]
    assert strip[0] == strip[1]
    assert all(torch.equal(whole.models["server"][k], resumed.models["server"][k]) for k in ("global", "local"))


@pytest.mark.parametrize("bench", ["pacs", "officehome", "vlcs", "domainnet"])
def test_dry_run_counts_one_prompt_per_round_on_every_data_set(bench, tmp_path, capsys):
    path = REPO / "configs" / bench / "fedotp.yaml"
    cfg = load_config(path)
    root = _fake_tree(tmp_path, get_dataset(cfg.data.name))
    assert main(["run", str(path), "--dry-run", "--data-root", str(root)]) == 0
    row = next(line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("  fedotp "))
    assert row == ["fedotp", "8,192", "32,768", "8,192"]  # per round, bytes per round, uploaded once


def _colour_tree(root: Path, spec, per_class: int) -> Path:
    """<root>/<data set folder>/<domain>/<class>/<n>.png: small plain images, each its own colour."""
    for d, domain in enumerate(spec.domains):
        for c, cls in enumerate(spec.classes):
            folder = root / spec.folder_names[0] / domain / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (8, 8), (40 * d, 30 * c, 2 * i % 256)).save(folder / f"{i}.png")
    return root


def test_a_run_holds_far_less_of_the_patch_tokens_than_its_cache(tmp_path, monkeypatch):
    """A few thousand images: the patch tensors alive at once (read per batch) stay a small part of the file."""
    pacs = get_dataset("pacs")
    cfg = parse_config({**CONFIG, "data": {"name": "pacs", "root": str(_colour_tree(tmp_path, pacs, 110)),
                                           "targets": [TARGET]},
                        "train": {"rounds": 1, "batch_size": 32, "lr": 0.05},
                        "methods": [{"name": "fedotp", "n_ctx": 2}]})
    ws = prepare(cfg)
    live, peak = [0], [0]
    rows = PatchFile.rows

    def counted(self, index):
        out = rows(self, index)
        live[0] += out.nbytes
        peak[0] = max(peak[0], live[0])
        weakref.finalize(out, lambda n=out.nbytes: live.__setitem__(0, live[0] - n))
        return out

    monkeypatch.setattr(PatchFile, "rows", counted)
    run_federation(ws.methods[0], ws.clients(TARGET, SEED), ws.target(TARGET), cfg.train, SEED, lambda _: None)
    images = sum(len(d) for d in ws.domains.values())
    cache = sum(f.patches.path.stat().st_size for f in ws.frozen.values())
    assert images >= 3000 and cache >= images * 64 * 64 * 2  # [grid² = 64, E = 64] at 16 bits per image
    # the largest batch read (an evaluation batch of 100 images, as fp32) is under 7% of a 3,080-image cache
    assert 0 < peak[0] <= cache / 10

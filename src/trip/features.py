"""The frozen path, computed once per image and cached: image features, and what the experiment's methods
declare (`Inputs`): the CLS token of the final block, the router's mixture weights for every routing setting,
the patch tokens (a memory-mapped file of their own, `trip.patchcache`).

With no augmentation every image maps to one fixed tensor, so this is exact. A cache file is named by the
backbone's identity, the preprocessing version and the SHA-256 of the domain's sorted relative image paths;
it records the SHA-256 of every image's (path, size, mtime) and of its own tensors (`trip.safefile`). Images
changed on disk, or a file altered, cut short or for other images, are recomputed (with a note), never
half-used."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from trip import routing, safefile
from trip.backbone import Backbone, load_image
from trip.data.folder import Domain
from trip.errors import TripError, cannot_write
from trip.patchcache import PatchFile, RawWriter
from trip.progress import progress


@dataclass(frozen=True)
class RoutingSpec:
    """Everything that determines a router output for an image, besides the image and the backbone."""

    num_experts: int
    capacity: float | None  # None: plain k-means (ablation)
    iters: int = 100
    key_seed: int = 0  # seeds the static keys and, with the image id and the run, each image's k-means init
    assignment: str = "hungarian"
    run: str = "train"  # "train" or "infer": the official router draws a fresh init for each of the two runs
    tol: float = 1e-4  # k-means stops when the centroids move less than this (mean over clusters)

    def key(self) -> str:
        return "route-" + hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Inputs:
    """The frozen inputs a method reads per image, besides its image feature and label (always there). The store
    computes and caches exactly the union of what the experiment's methods declare."""

    norms: bool = False  # [n] the image feature's norm before normalisation
    cls: bool = False  # [n, Dv] final-block CLS token, before ln_post
    patches: bool = False  # [n, grid², E] patch tokens after ln_post and the projection (CLS dropped), on disk
    routing: tuple[RoutingSpec, ...] = ()  # [n, M] mixture weights of each spec

    def __or__(self, other: Inputs) -> Inputs:
        return Inputs(self.norms or other.norms, self.cls or other.cls, self.patches or other.patches,
                      tuple(dict.fromkeys(self.routing + other.routing)))


@dataclass
class DomainFeatures:
    features: torch.Tensor  # [L, E] image features, unnormalised
    cls: torch.Tensor | None  # [L, Dv] final-block CLS token (before ln_post), where declared
    routing: dict[str, torch.Tensor]  # RoutingSpec.key() -> [L, M] mixture weights
    patches: PatchFile | None = None  # [L, grid², E] on disk, where declared


# Part of every cache key: bumped whenever the pixels or the router's draws of an image change
# (2: RGB conversion after the crop, as open_clip; a k-means init per routing run).
FORMAT = 2


def image_id(relative_path: str) -> int:
    """A stable 48-bit id per image: seeds its k-means init whatever batch it lands in."""
    return int.from_bytes(hashlib.blake2b(relative_path.encode(), digest_size=6).digest(), "big")


def paths_digest(paths: list[str]) -> str:
    return hashlib.sha256("\n".join(paths).encode()).hexdigest()


def images_digest(domain: Domain) -> str:
    """SHA-256 of every image's (relative path, size, mtime_ns): a stat per file, cheap even for DomainNet."""
    h = hashlib.sha256()
    for p in domain.paths:
        try:
            st = os.stat(domain.root / p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:  # reading it fails later, with a message that names the file
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()


class FrozenStore:
    def __init__(self, backbone: Backbone, cache_root: Path, batch_size: int = 64):
        self.backbone = backbone
        ident = hashlib.sha256(f"{backbone.identity}|format{FORMAT}".encode()).hexdigest()[:12]
        self.folder = cache_root / "frozen" / ident
        self.batch_size = batch_size

    def load(self, dataset: str, domain: Domain, inputs: Inputs) -> DomainFeatures:
        digest = paths_digest(domain.paths)
        path = self.folder / dataset / f"{domain.name}-{digest[:16]}.safetensors"
        meta = {"paths_sha256": digest, "images_sha256": images_digest(domain), "count": str(len(domain))}
        cached = _read(path, meta, domain.name) or {}
        wanted = {s.key(): s for s in inputs.routing}
        names = ["features", *(["cls"] if inputs.cls else []), *wanted]
        patch_path = path.with_suffix(".patches")

        def rebuild() -> None:
            self._compute(domain, [], False, patch_path, meta)

        patches = PatchFile.open(patch_path, meta, rebuild) if inputs.patches else None
        missing = [n for n in names if n not in cached]
        build_patches = inputs.patches and patches is None
        if missing or build_patches:
            fresh = self._compute(domain, [wanted[k] for k in missing if k in wanted], "cls" in missing,
                                  patch_path if build_patches else None, meta)
            if missing:
                cached = {**cached, **fresh}  # keeps what earlier runs computed for other inputs
                safefile.store_in_cache(lambda: safefile.write_tensors(path, cached, meta), "frozen features", path)
            if build_patches:
                patches = PatchFile.open(patch_path, meta, rebuild)
        return DomainFeatures(cached["features"], cached.get("cls") if inputs.cls else None,
                              {k: cached[k] for k in wanted}, patches)

    @torch.no_grad()
    def _compute(self, domain: Domain, specs: list[RoutingSpec], cls: bool, patch_path: Path | None,
                 meta: dict[str, str]) -> dict[str, torch.Tensor]:
        """Features, and the CLS tokens, routing weights and patch tokens asked for, in one pass over the images.
        Patch tokens go batch by batch to a raw fp16 file (never whole in RAM)."""
        keys = {s.key(): routing.static_keys(s.num_experts, self.backbone.vision_width, s.key_seed) for s in specs}
        ids = torch.tensor([image_id(p) for p in domain.paths], dtype=torch.int64)
        out: dict[str, list[torch.Tensor]] = {"features": [], **({"cls": []} if cls else {}), **{k: [] for k in keys}}
        loader = DataLoader(_Images(domain, self.backbone.transform()), batch_size=self.batch_size,
                            num_workers=_workers(len(domain)))
        raw = RawWriter(patch_path, meta) if patch_path is not None else contextlib.nullcontext()
        start = 0
        try:  # the patch tokens stream to their file: a full or read-only cache stops the pass
            with raw:
                for pixels in progress(loader, desc=f"frozen features {domain.name}", unit="batches"):
                    feats, tokens = self.backbone.encode_images(pixels)
                    batch_ids = ids[start:start + len(pixels)]
                    start += len(pixels)
                    out["features"].append(feats.cpu())
                    if cls:
                        out["cls"].append(tokens[:, 0].cpu())
                    if patch_path is not None:
                        raw.write(self.backbone.project_patches(tokens))
                    for spec in specs:
                        k = spec.key()
                        w = routing.route(tokens, keys[k].to(tokens.device), spec.capacity, image_ids=batch_ids,
                                          seed=spec.key_seed, run=spec.run, assignment=spec.assignment,
                                          max_iters=spec.iters, tol=spec.tol)
                        out[k].append(w.float().cpu())
        except OSError as err:
            if patch_path is None:
                raise
            raise cannot_write(patch_path, err, "the patch-token cache") from None
        return {k: torch.cat(v) for k, v in out.items()}


class _Images(Dataset):
    def __init__(self, domain: Domain, transform):
        self.domain, self.transform = domain, transform

    def __len__(self) -> int:
        return len(self.domain)

    def __getitem__(self, i: int) -> torch.Tensor:
        path = self.domain.root / self.domain.paths[i]
        try:
            return self.transform(load_image(path))
        except OSError as err:
            raise TripError(f"cannot read image {path}: {err}. Run `trip data verify` to list every bad "
                            f"file, then remove them or set data.skip_bad_images: true") from None


def _workers(n: int) -> int:
    return 0 if n < 2000 else min(8, max(0, (os.cpu_count() or 1) - 1))


def _read(path: Path, meta: dict[str, str], domain: str) -> dict[str, torch.Tensor] | None:
    """The cached tensors if the file is whole and was made from these images; else None (with a note)."""
    if not path.is_file():
        return None
    try:
        tensors, stored = safefile.read_tensors(path)
        _check_shapes(tensors, int(meta["count"]))
    except safefile.BadFile as err:
        safefile.warn_rebuild("frozen-feature cache", path, err)
        return None
    if stored.get("paths_sha256") != meta["paths_sha256"]:
        safefile.warn_rebuild("frozen-feature cache", path, "it belongs to other images")
        return None
    if stored.get("images_sha256") != meta["images_sha256"]:
        print(f"note: images of {domain} changed on disk (size or modification time) since their features were "
              f"cached; recomputing them", file=sys.stderr)
        return None
    return tensors


def _check_shapes(tensors: dict[str, torch.Tensor], count: int) -> None:
    if "features" not in tensors:
        raise safefile.BadFile("features missing")
    for name, t in tensors.items():
        if t.dim() != 2 or len(t) != count:
            raise safefile.BadFile(f"{name} has shape {tuple(t.shape)}, expected {count} rows")

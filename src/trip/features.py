"""The frozen path, computed once per image and cached (spec §10.2): image features, the CLS token of
the final block, and the router's mixture weights for every routing setting a run needs.

With no augmentation every image maps to one fixed tensor, so this is exact. A cache file is bound to
the backbone's identity and to the sorted list of the domain's relative image paths (its SHA-256 is in
the file and in its name); a file that does not match, or does not load, is rebuilt, never half-used."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from trip import routing
from trip.backbone import Backbone, load_image
from trip.data.folder import Domain
from trip.errors import TripError


@dataclass(frozen=True)
class RoutingSpec:
    """Everything that determines a router output for an image, besides the image and the backbone."""

    num_experts: int
    capacity: float | None  # None: plain k-means (ablation)
    iters: int = 100
    key_seed: int = 0  # seeds the static keys and, with the image id, each image's k-means init
    assignment: str = "hungarian"

    def key(self) -> str:
        return "route-" + hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class DomainFeatures:
    features: torch.Tensor  # [L, E] image features, unnormalised
    cls: torch.Tensor  # [L, Dv] final-block CLS token (before ln_post)
    routing: dict[str, torch.Tensor]  # RoutingSpec.key() -> [L, M] mixture weights


def image_id(relative_path: str) -> int:
    """A stable 48-bit id per image: seeds its k-means init whatever batch it lands in."""
    return int.from_bytes(hashlib.blake2b(relative_path.encode(), digest_size=6).digest(), "big")


def paths_digest(paths: list[str]) -> str:
    return hashlib.sha256("\n".join(paths).encode()).hexdigest()


class FrozenStore:
    def __init__(self, backbone: Backbone, cache_root: Path, batch_size: int = 64):
        self.backbone = backbone
        ident = hashlib.sha256(backbone.identity.encode()).hexdigest()[:12]
        self.folder = cache_root / "frozen" / ident
        self.batch_size = batch_size

    def load(self, dataset: str, domain: Domain, specs: list[RoutingSpec]) -> DomainFeatures:
        digest = paths_digest(domain.paths)
        path = self.folder / dataset / f"{domain.name}-{digest[:16]}.safetensors"
        cached = _read(path, digest)
        wanted = {s.key(): s for s in specs}
        if cached is not None and all(k in cached for k in wanted):
            return _unpack(cached, wanted)
        fresh = self._compute(domain, list(wanted.values()))
        if cached is not None:  # keep routing settings computed earlier for other runs
            fresh = {**cached, **fresh}
        _write(path, fresh, digest, len(domain))
        return _unpack(fresh, wanted)

    @torch.no_grad()
    def _compute(self, domain: Domain, specs: list[RoutingSpec]) -> dict[str, torch.Tensor]:
        keys = {s.key(): routing.static_keys(s.num_experts, self.backbone.vision_width, s.key_seed) for s in specs}
        ids = torch.tensor([image_id(p) for p in domain.paths], dtype=torch.int64)
        out: dict[str, list[torch.Tensor]] = {"features": [], "cls": [], **{k: [] for k in keys}}
        loader = DataLoader(_Images(domain, self.backbone.transform()), batch_size=self.batch_size,
                            num_workers=_workers(len(domain)))
        start = 0
        for pixels in tqdm(loader, desc=f"frozen features {domain.name}", leave=False):
            feats, tokens = self.backbone.encode_images(pixels)
            batch_ids = ids[start:start + len(pixels)]
            start += len(pixels)
            out["features"].append(feats.cpu())
            out["cls"].append(tokens[:, 0].cpu())
            for spec in specs:
                k = spec.key()
                w = routing.route(tokens, keys[k].to(tokens.device), spec.capacity, image_ids=batch_ids,
                                  seed=spec.key_seed, assignment=spec.assignment, max_iters=spec.iters)
                out[k].append(w.float().cpu())
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


def _read(path: Path, digest: str) -> dict[str, torch.Tensor] | None:
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("paths_sha256") != digest:
                return None
        return load_file(path)
    except (SafetensorError, OSError, ValueError):
        return None  # truncated or corrupt: recompute


def _write(path: Path, tensors: dict[str, torch.Tensor], digest: str, count: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
              metadata={"paths_sha256": digest, "count": str(count)})
    os.replace(tmp, path)


def _unpack(tensors: dict[str, torch.Tensor], wanted: dict[str, RoutingSpec]) -> DomainFeatures:
    n = len(tensors["features"])
    for k in wanted:
        if len(tensors[k]) != n:
            raise TripError(f"frozen cache is inconsistent ({k} has {len(tensors[k])} rows, features {n}); "
                            f"delete the cache folder and rerun")
    return DomainFeatures(tensors["features"], tensors["cls"], {k: tensors[k] for k in wanted})

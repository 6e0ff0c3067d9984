"""What every method shares: the data a method sees (a view over cached frozen inputs) and the method contract.

A method declares, besides its forward pass (`loss`, `logits`):
- `inputs()`: the frozen inputs it reads per image (`trip.features.Inputs`); the store caches exactly those;
- `optimizer()`: its local optimizer (None: train's AdamW) and `aggregation` ("weighted" by client size, or
  "uniform");
- `init_params(seed)`: the tensors that travel each round (their count: `count_params`);
- `init_private(seed, client, clients)`: tensors a client keeps across rounds and never sends; a client trains
  them with the shared ones (`loss` gets both in one dict), an engine keeps them and checkpoints them;
  `check_clients(clients)` refuses, before a run starts, a number of clients it cannot serve;
- `target_upload(private)` and `target_model(shared, uploads)`: how the held-out domain is predicted when that
  differs from how clients train. A client uploads `target_upload` once (counted by `count_upload`, apart from the
  per-round cost); `target_model` builds the deployed model from the shared tensors and every client's upload.
  That deployed model is what `logits` gets for evaluation, on the target *and* on the source validation splits
  that select the round, so the round is selected for the model that is deployed;
- `novel_classes`: whether it can score classes no client trained on (base-to-novel, `trip.classes`). Such a
  method honours `Split.classes`: `loss` and `logits` score a batch among the split's classes only, each class's
  logit computed as if the method had been built on that class list.
- `personal_model(shared, private)`: a client's personalised model, tested under `protocol: multidomain` on its
  own domain's test split beside the deployed one (None, the default: the method has none). It is built where the
  private tensors are (a Flower SuperNode), from the current global tensors and the client's private ones."""

from __future__ import annotations

from typing import Literal

import torch

from trip.backbone import Backbone
from trip.config import OptimizerCfg
from trip.features import Inputs
from trip.patchcache import PatchFile

Tensors = dict[str, torch.Tensor]


class PatchRows:
    """Some rows of a patch-token file, read only when a batch asks for them."""

    def __init__(self, file: PatchFile, index: torch.Tensor):
        self.file, self.index = file, index

    def __getitem__(self, idx: torch.Tensor | slice) -> PatchRows:
        return PatchRows(self.file, self.index[idx.cpu() if isinstance(idx, torch.Tensor) else idx])

    def __len__(self) -> int:
        return len(self.index)


class Split:
    """The frozen view of some images: labels and named inputs ("features" [n, E] L2-normalised, "norms" [n],
    "cls" [n, Dv], "patches" [n, grid², E], RoutingSpec.key() [n, M]), all a method needs to train or predict.
    `split[name]` gives one input on the split's device; patch tokens are read from disk then.

    `classes`: the class columns its images are scored among (indices into the method's class list; a label is
    a position in this tuple); None: every class, a label is a class index. `parts`: how evaluation scores the
    split (`parts()`), None: as a whole."""

    def __init__(self, labels: torch.Tensor, inputs: dict[str, torch.Tensor | PatchRows],
                 device: torch.device | None = None, classes: tuple[int, ...] | None = None,
                 parts: dict[str, tuple[int, ...]] | None = None):
        self.labels = labels  # [n] int64
        self.inputs = inputs
        self.device = device or labels.device
        self.classes = classes
        self.part_classes = parts
        self._parts: dict[str, Split] | None = None

    @property
    def features(self) -> torch.Tensor:
        return self["features"]

    def __getitem__(self, name: str) -> torch.Tensor:
        value = self.inputs.get(name)
        if value is None:
            raise KeyError(f"the split has no input {name!r}: the method must declare it in inputs()")
        return value.file.rows(value.index).to(self.device) if isinstance(value, PatchRows) else value

    def __contains__(self, name: str) -> bool:
        return name in self.inputs

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx: torch.Tensor | slice) -> Split:
        return Split(self.labels[idx], {k: v[idx] for k, v in self.inputs.items()}, self.device, self.classes)

    def of_classes(self, classes: tuple[int, ...]) -> Split:
        """Its images of `classes` (class indices), scored among those classes only."""
        if self.classes is not None:
            raise ValueError("of_classes cuts a split scored among every class")
        cols = torch.as_tensor(classes, dtype=torch.int64, device=self.labels.device)
        keep = torch.isin(self.labels, cols).nonzero().squeeze(1)
        position = torch.full((int(max(classes)) + 1,), -1, dtype=torch.int64, device=self.labels.device)
        position[cols] = torch.arange(len(classes), device=self.labels.device)
        part = self.take(keep)
        return Split(position[part.labels], part.inputs, self.device, tuple(classes))

    def parts(self) -> dict[str, Split]:
        """What evaluation scores separately, by name: the split itself (""), or each of `part_classes`' parts
        (`of_classes`), the first one the part that selects the round. Built once."""
        if self.part_classes is None:
            return {"": self}
        if self._parts is None:
            self._parts = {name: self.of_classes(cols) for name, cols in self.part_classes.items()}
        return self._parts

    def columns(self, per_class):
        """The rows of a per-class tensor (or `PromptTokens`) for the classes this split is scored among."""
        return per_class if self.classes is None else per_class[list(self.classes)]


class Method:
    """Base class: the defaults are a method with shared tensors only, AdamW, size-weighted averaging, and the
    same model for training and the held-out domain."""

    uses_bma = False
    novel_classes = False  # it scores classes no client trained on, honouring Split.classes (module docstring)
    eval_batch_size = 256
    aggregation: Literal["weighted", "uniform"] = "weighted"

    def __init__(self, cfg, backbone: Backbone, class_names: tuple[str, ...]):
        self.cfg = cfg
        self.backbone = backbone
        self.class_names = class_names
        self.label = cfg.label or cfg.name

    @staticmethod
    def count_params(cfg, text_width: int, vision_width: int, classes: int) -> int:
        """Parameters one client sends (and receives) per round."""
        return 0

    @staticmethod
    def count_upload(cfg, text_width: int, vision_width: int, classes: int) -> int:
        """Parameters one client uploads once, at the end, for the target prediction (`target_upload`); more than
        0 rules out secure aggregation, which never shows the server one client's tensors (docs/federation.md)."""
        return 0

    @property
    def comm_params(self) -> int:
        return self.count_params(self.cfg, self.backbone.text_width, self.backbone.vision_width, len(self.class_names))

    @property
    def upload_params(self) -> int:
        return self.count_upload(self.cfg, self.backbone.text_width, self.backbone.vision_width, len(self.class_names))

    @property
    def trainable(self) -> bool:
        return self.comm_params > 0

    def inputs(self) -> Inputs:
        return Inputs()

    def optimizer(self) -> OptimizerCfg | None:
        return getattr(self.cfg, "optimizer", None)  # a method config's `optimizer` key, where it has one

    def init_params(self, seed: int) -> Tensors:
        return {}

    def check_clients(self, clients: int) -> None:
        """Refuses (TripError) a run of `clients` source clients that the method cannot train; any by default."""

    def init_private(self, seed: int, client: int, clients: int) -> Tensors:
        return {}

    def target_upload(self, private: Tensors) -> Tensors:
        return {}

    def target_model(self, shared: Tensors, uploads: list[Tensors]) -> Tensors:
        return shared

    def personal_model(self, shared: Tensors, private: Tensors) -> Tensors | None:
        """The model a client with `private` predicts its own domain with (what `logits` gets), or None."""
        return None

    def loss(self, params: Tensors, batch: Split) -> torch.Tensor:
        """`params`: the shared tensors and the client's private ones, in one dict (names never clash)."""
        raise NotImplementedError

    def logits(self, params: Tensors, batch: Split) -> torch.Tensor:
        """`params`: the deployed model, `target_model(shared, uploads)`."""
        raise NotImplementedError


def gaussian_init(shape: tuple[int, ...], seed: int, device: torch.device) -> torch.Tensor:
    """N(0, 0.02²) from a private generator, so the global RNG never matters."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * 0.02).to(device)

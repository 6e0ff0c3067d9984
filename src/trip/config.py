"""The experiment config: typed, validated before anything runs, YAML in and out."""

from __future__ import annotations

import importlib
import math
import os
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trip.errors import TripError

SEED_LIMIT = 2**32  # numpy's RandomState takes seeds 0 .. 2**32 - 1
ALL_DOMAINS = "all"  # the `target` of a multidomain run (results.json, rounds.jsonl, checkpoints): no domain held out


WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def names_a_weights_file(pretrained: str) -> bool:
    """backbone.pretrained is a file's path rather than an open_clip tag such as 'openai'."""
    return Path(pretrained).suffix in WEIGHT_SUFFIXES or "/" in pretrained


class _Strict(BaseModel):
    # No .inf or .nan where a number is expected: `0 < x` lets .inf through to code that cannot use it
    # (federation.dirichlet_alpha: .inf reached numpy's Dirichlet draw). DPCfg allows an infinite clipping_norm.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class BackboneCfg(_Strict):
    name: str = "ViT-B-16"  # an open_clip model name, or "tiny" (test-sized CLIP)
    # An open_clip pretrained tag ("openai"), a local checkpoint file, "synthetic" (tiny only:
    # pretrained on the synthetic caption corpus, cached), or null for random weights.
    pretrained: str | None = "openai"
    quick_gelu: bool | None = None  # None: on for OpenAI weights (the "openai" tag or a local file)
    # tiny with pretrained "synthetic" only: the synthetic styles its pretraining corpus holds (None: all four), so
    # that a held-out style can be one the backbone never saw (pretrained once per choice, then cached)
    pretrain_styles: list[str] | None = None

    @field_validator("pretrain_styles")
    @classmethod
    def _styles_known_and_distinct(cls, styles: list[str] | None) -> list[str] | None:
        if styles is None:
            return None
        from trip.data.synthetic import DOMAINS, in_style_order  # a light module: numpy and Pillow

        unknown = [s for s in styles if s not in DOMAINS]
        if unknown or not styles:
            raise ValueError(f"pretrain_styles {styles}: name one or more of the synthetic styles "
                             f"{', '.join(DOMAINS)}")
        _refuse_repeats(styles, "pretrain style", "a style is in the corpus or not")
        return list(in_style_order(styles))

    @model_validator(mode="after")
    def _styles_only_for_the_synthetic_tiny_clip(self) -> BackboneCfg:
        if self.pretrain_styles is not None and (self.name, self.pretrained) != ("tiny", "synthetic"):
            raise ValueError("pretrain_styles chooses the corpus of the tiny CLIP's synthetic pretraining: it needs "
                             "backbone name tiny and pretrained synthetic (remove it for other backbones)")
        return self

    @model_validator(mode="after")
    def _tiny_weights_of_a_kind_it_has(self) -> BackboneCfg:
        tag = self.pretrained
        if self.name == "tiny" and tag not in (None, "synthetic") and not names_a_weights_file(tag):
            raise ValueError(f"backbone.pretrained {tag!r}: the tiny CLIP has no open_clip weights (pretrained is "
                             f"'openai' unless set): write `pretrained: synthetic` (the demo's tiny CLIP, "
                             f"pretrained on synthetic captions), `pretrained: null` (random weights) or the path "
                             f"of a weights file")
        return self


class DataCfg(_Strict):
    name: str = "synthetic"
    root: str | None = None  # None: $TRIP_DATA, or the cache folder for the synthetic set
    targets: list[str] | Literal["all"] = "all"  # held-out domains, one leave-one-out run each
    val_fraction: float = Field(0.2, gt=0, lt=1)
    # multidomain: the share of each domain's images held out as its in-domain test split (seeded, the same for
    # every seed); with domainnet_splits: official, DomainNet's <domain>_test.txt is the test split instead
    test_fraction: float = Field(0.2, gt=0, lt=1)
    images_per_class: int = Field(40, ge=2)  # synthetic only
    # synthetic only: how far the styles diverge, 0 (every domain drawn alike) to 1 (each in its full style)
    shift: float = Field(1.0, ge=0, le=1)
    shots_per_class: int | None = Field(None, ge=1)  # few-shot: k train images per class per client; None: all
    max_images_per_domain: int | None = Field(None, ge=4)  # subsample (seeded) for smoke tests
    skip_bad_images: bool = False  # True: leave unreadable images out (counted in results.json); False: refuse
    domainnet_splits: Literal["all", "official"] = "all"  # official: only images in <domain>_train/_test.txt
    class_list: Literal["canonical", "folders"] = "canonical"  # folders: the copy's sorted class folder names

    @field_validator("targets")
    @classmethod
    def _targets_listed_once(cls, targets: list[str] | str) -> list[str] | str:
        if isinstance(targets, list):
            if not targets:
                raise ValueError("no held-out domain listed: name at least one, or write `targets: all`")
            _refuse_repeats(targets, "held-out domain", "a repeated target is the same run again")
        return targets

    @model_validator(mode="after")
    def _shift_only_for_synthetic(self) -> DataCfg:
        if self.shift != 1 and self.name != "synthetic":
            raise ValueError(f"data.shift {self.shift} draws the synthetic styles closer together; {self.name} is "
                             f"a real data set whose shift is what it is: remove data.shift")
        return self


class TrainCfg(_Strict):
    rounds: int = Field(15, ge=1)
    local_epochs: int = Field(1, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(5e-4, gt=0)
    lr_decay: float = Field(0.8, gt=0, le=1)  # round r trains with lr * lr_decay**r (docs/method.md §1.6 `gamma`)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-7, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    # A client's FedAvg weight: "images", the images it holds (train + val, as the official server weighs),
    # or "train", its train-split size.
    fedavg_weight: Literal["images", "train"] = "images"


class SecAggCfg(_Strict):
    """Flower's SecAgg+ settings, with Flower's defaults (docs/federation.md, "Secure aggregation"). An int
    `num_shares` is a count of SuperNodes (> 2), a float the share of the round's SuperNodes; likewise
    `reconstruction_threshold` is a count (< num_shares) or a share of num_shares."""

    num_shares: int | float = 3  # each SuperNode's secrets are split among this many SuperNodes (itself included)
    reconstruction_threshold: int | float = 2  # shares that rebuild a secret: SuperNodes that must stay
    clipping_range: float = Field(8.0, gt=0)  # a pre-scaled value must lie in [-c, c]
    quantization_range: int = Field(2**22, ge=2)  # T: [-c, c] is mapped to the integers 0..T
    max_weight: float = Field(1000.0, gt=0)  # M: a SuperNode's update is pre-scaled by its weight / M
    modulus_range: int = Field(2**32, ge=4)  # masks and sums live modulo this power of 2 (at most 2**32)

    @model_validator(mode="after")
    def _a_valid_secaggplus_setup(self) -> SecAggCfg:
        shares, threshold = self.num_shares, self.reconstruction_threshold
        if isinstance(shares, int) and shares != 1 and shares <= 2:
            raise ValueError(f"secagg.num_shares {shares}: a count must be at least 3 (or a share, e.g. 1.0)")
        if isinstance(shares, float) and not 0 < shares <= 1:
            raise ValueError(f"secagg.num_shares {shares}: a share must be in (0, 1]")
        if isinstance(threshold, float) and not 0 < threshold <= 1:
            raise ValueError(f"secagg.reconstruction_threshold {threshold}: a share must be in (0, 1]")
        if isinstance(threshold, int) and (threshold < 1 or isinstance(shares, int) and 1 < threshold >= shares):
            raise ValueError(f"secagg.reconstruction_threshold {threshold} must be a count from 1 (all shares) to "
                             f"num_shares - 1, or a share of num_shares such as 0.67")
        if self.modulus_range.bit_count() != 1 or self.modulus_range > 2**32:
            raise ValueError(f"secagg.modulus_range {self.modulus_range} must be a power of 2, at most 2**32")
        if self.modulus_range <= self.quantization_range:
            raise ValueError(f"secagg.modulus_range {self.modulus_range} must exceed quantization_range "
                             f"{self.quantization_range}")
        return self


class DPCfg(_Strict):
    """Client-level differential privacy of the shared tensors with Flower's fixed-clipping wrappers
    (docs/federation.md)."""

    # `.inf` clipping_norm accepted, and kept in the run config
    model_config = ConfigDict(extra="forbid", allow_inf_nan=True, ser_json_inf_nan="constants")

    mode: Literal["client", "server"]  # who clips each update: the ClientApp, or the server; the server adds noise
    clipping_norm: float = Field(gt=0)  # L2 norm each client's update (new - global tensors) is clipped to; .inf
    noise_multiplier: float = Field(ge=0, allow_inf_nan=False)  # noise std = this * clipping_norm / clients sampled
    delta: float = Field(1e-5, gt=0, lt=1)  # the delta of the reported (epsilon, delta)

    @model_validator(mode="after")
    def _noise_needs_a_bound(self) -> DPCfg:
        if math.isinf(self.clipping_norm) and self.noise_multiplier > 0:
            raise ValueError("an infinite clipping_norm bounds no update, so no noise can protect it (its std "
                             "would be infinite): give a finite clipping_norm, or noise_multiplier 0")
        return self


class FederationCfg(_Strict):
    """Who the clients are and who takes part in a round (docs/federation.md)."""

    clients_per_domain: int = Field(1, ge=1)  # K: each source domain is split into K clients
    partition: Literal["iid", "dirichlet"] = "iid"  # how a domain's images are dealt to its K clients
    dirichlet_alpha: float = Field(0.5, gt=0)  # label skew of `dirichlet`: smaller is more skewed; finite
    min_client_size: int = Field(5, ge=2)  # images a client must hold; a split that cannot give them is refused
    fraction: float = Field(1.0, gt=0, le=1)  # clients sampled per round (at least one)
    drop_rate: float = Field(0.0, ge=0, lt=1)  # chance that a sampled client fails to report
    # the server sees only the weighted sum of each round's updates (Flower's SecAgg+; Flower engines only)
    secure_aggregation: bool = False
    secagg: SecAggCfg = Field(default_factory=SecAggCfg)
    dp: DPCfg | None = None  # differential privacy (Flower engines only)

    @model_validator(mode="after")
    def _one_privacy_mechanism(self) -> FederationCfg:
        if self.secure_aggregation and self.dp is not None:
            raise ValueError("federation.dp and federation.secure_aggregation together are not supported: Flower's "
                             "DP wrappers clip and check individual updates, which secure aggregation hides; "
                             "choose one")
        return self


class OptimizerCfg(_Strict):
    """A method's own optimizer. Unset fields fall back to `train`'s; its lr follows train's per-round
    schedule (round r trains with lr * train.lr_decay**r)."""

    # adam: L2 weight decay added to the gradient (torch.optim.Adam); sgd: torch.optim.SGD with momentum
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float | None = Field(None, gt=0)
    betas: tuple[float, float] | None = None  # adam/adamw only
    eps: float | None = Field(None, gt=0)  # adam/adamw only
    weight_decay: float | None = Field(None, ge=0)
    momentum: float = Field(0.0, ge=0, lt=1)  # sgd only

    @model_validator(mode="after")
    def _fields_of_its_kind(self) -> OptimizerCfg:
        if self.name == "sgd" and (self.betas is not None or self.eps is not None):
            raise ValueError("optimizer sgd takes no betas or eps: remove them, or choose adam/adamw")
        if self.name != "sgd" and self.momentum:
            raise ValueError(f"optimizer {self.name} takes no momentum (its betas play that part): remove it, "
                             f"or choose sgd")
        return self


class ZeroShotCfg(_Strict):
    name: Literal["zeroshot"]
    label: str | None = None
    templates: Literal["single", "ensemble"] = "ensemble"


class LinearProbeCfg(_Strict):
    """A linear classifier on the frozen L2-normalised image feature, FedAvg'd (docs/method.md §7.3)."""

    name: Literal["linear-probe"]
    label: str | None = None
    optimizer: OptimizerCfg | None = None  # None: train's AdamW settings (weight decay included)


class PromptFLCfg(_Strict):
    name: Literal["promptfl"]
    label: str | None = None
    n_ctx: int = Field(16, ge=1)
    optimizer: OptimizerCfg | None = None  # None: train's AdamW settings


class TripCfg(_Strict):
    """TRIP, TRIP-Lite and their ablations (docs/method.md §2–§6, §7.2)."""

    name: Literal["trip", "trip-lite"]
    label: str | None = None
    num_experts: int = Field(4, ge=1)
    n_ctx: int = Field(32, ge=1)
    kl_weight: float = Field(1.0, ge=0)  # the official code's `alpha`
    teacher: Literal["ensemble", "single"] = "ensemble"
    # token: the parameter-free router; image-hard/-soft: route the CLS token; uniform: w = 1/M;
    # learned: a linear gate on the CLS token, trained and communicated with the experts.
    routing: Literal["token", "image-hard", "image-soft", "uniform", "learned"] = "token"
    assignment: Literal["hungarian", "random", "greedy"] = "hungarian"
    capacity_train: float | None = Field(1.0, gt=0)  # None: plain k-means without capacity
    capacity_infer: float | None = Field(2.0, gt=0)
    kmeans_iters: int = Field(100, ge=1)
    kmeans_tol: float = Field(1e-4, ge=0)  # stop when the centroids move less than this (0: run every iteration)
    key_seed: int = 0
    image_temperature: float = Field(0.1, gt=0)
    tie_expert_init: bool = False  # True reproduces the official identical init (docs/reproduce.md B1)
    bma: bool = True
    bma_beta: float = Field(0.2, gt=0)
    bma_include_init: bool = True
    optimizer: OptimizerCfg | None = None  # None: train's AdamW settings

    @model_validator(mode="before")
    @classmethod
    def _lite_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("name") == "trip-lite":
            data = {"num_experts": 2, "n_ctx": 1, **data}
        return data


# FedCLIP's own optimizer (its code's defaults, docs/method.md §7.2).
FEDCLIP_OPTIMIZER = {"name": "adam", "lr": 5e-5, "betas": (0.9, 0.98), "eps": 1e-6, "weight_decay": 0.2}


class FedCLIPCfg(_Strict):
    """FedCLIP (docs/method.md §7.2): an attention adapter on the frozen image feature, FedAvg'd."""

    name: Literal["fedclip"]
    label: str | None = None
    # FedCLIP's Adam by default; a partial mapping changes only the keys it names; null: train's AdamW.
    optimizer: OptimizerCfg | None = Field(default_factory=lambda: OptimizerCfg(**FEDCLIP_OPTIMIZER))

    @model_validator(mode="before")
    @classmethod
    def _fedclip_optimizer(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("optimizer"), dict):
            data = {**data, "optimizer": {**FEDCLIP_OPTIMIZER, **data["optimizer"]}}
        return data


# FedOTP's own optimizer (Dassl's defaults in its official code, docs/reproduce.md "FedOTP").
FEDOTP_OPTIMIZER = {"name": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 5e-4}


class FedOTPCfg(_Strict):
    """FedOTP (docs/reproduce.md "FedOTP"): a global and a private local prompt per client, matched to the patch
    tokens by entropic optimal transport; only the global prompt travels."""

    name: Literal["fedotp"]
    label: str | None = None  # None: "fedotp", or "fedotp-<target_mode>" for a target_mode other than the default
    n_ctx: int = Field(16, ge=1)
    ot: Literal["cot", "sinkhorn"] = "cot"
    gamma: float = Field(0.8, gt=0, le=1)  # COT: the mass each prompt receives (the official `top_percent`)
    eps: float = Field(0.1, gt=0)
    max_iters: int = Field(100, ge=1)
    tol: float = Field(1e-3, ge=0)
    # How the held-out domain is predicted (the official code has no such path): with the global prompt and the
    # mean of the clients' local prompts (uploaded once), the global prompt alone, the mean logits of the clients'
    # personalised models, or the global prompt with the local prompt at its untrained init (PMFLT).
    target_mode: Literal["global_plus_mean_local", "global_only", "source_ensemble", "global_plus_init"] = \
        "global_plus_mean_local"
    # FedOTP's SGD by default; a partial mapping changes only the keys it names; null: train's AdamW.
    optimizer: OptimizerCfg | None = Field(default_factory=lambda: OptimizerCfg(**FEDOTP_OPTIMIZER))

    @model_validator(mode="before")
    @classmethod
    def _fedotp_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if isinstance(data.get("optimizer"), dict):
            data = {**data, "optimizer": {**FEDOTP_OPTIMIZER, **data["optimizer"]}}
        mode = data.get("target_mode", "global_plus_mean_local")
        if data.get("label") is None and mode != "global_plus_mean_local":
            data = {**data, "label": f"fedotp-{mode}"}  # every number names the target mode that produced it
        return data


# FedAPT's own optimizer: its code's make_optimizer (lr hard-coded, docs/reproduce.md "FedAPT").
FEDAPT_OPTIMIZER = {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-5}


class FedAPTCfg(_Strict):
    """FedAPT (Su et al., AAAI 2024; docs/reproduce.md "FedAPT"): a class-specific meta prompt modulated by frozen
    per-client keys, and a linear domain classifier that mixes the keys per image at inference."""

    name: Literal["fedapt"]
    label: str | None = None
    n_ctx: int = Field(16, ge=1)
    # Source clients of every run (one key and one domain-classifier output each): the data set's domains - 1,
    # 3 on PACS, VLCS and Office-Home, 5 on DomainNet. A run with another count stops with a message.
    sources: int = Field(3, ge=2)
    key_seed: int = 1  # the keys' shared seed (the official code seeds 1)
    temperature: float = Field(0.01, gt=0)  # of the key mixture at inference
    aggregation: Literal["uniform", "weighted"] = "uniform"  # uniform: equal weights, as the official server
    optimizer: OptimizerCfg | None = Field(default_factory=lambda: OptimizerCfg(**FEDAPT_OPTIMIZER))

    @model_validator(mode="before")
    @classmethod
    def _fedapt_optimizer(cls, data: Any) -> Any:
        own = data.get("optimizer") if isinstance(data, dict) else None
        if isinstance(own, dict) and own.get("name", "sgd") == "sgd":  # another optimizer starts from its defaults
            data = {**data, "optimizer": {**FEDAPT_OPTIMIZER, **own}}
        return data


_METHOD_CFGS: list[type[BaseModel]] = [ZeroShotCfg, LinearProbeCfg, PromptFLCfg, TripCfg, FedCLIPCfg, FedOTPCfg,
                                       FedAPTCfg]


def _method_union() -> Any:
    return Annotated[Union[tuple(_METHOD_CFGS)], Field(discriminator="name")]  # noqa: UP007 (a runtime tuple)


MethodCfg = _method_union()


class ExperimentCfg(_Strict):
    name: str = "experiment"
    # lodo: leave one domain out (each held-out domain a run); base2novel: lodo on the first half of the classes,
    # tested on both halves; multidomain: every domain a client, tested on its own held-out split (docs/reproduce.md)
    protocol: Literal["lodo", "base2novel", "multidomain"] = "lodo"
    seeds: list[int] = Field(default_factory=lambda: [42], min_length=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    backbone: BackboneCfg = Field(default_factory=BackboneCfg)
    data: DataCfg = Field(default_factory=DataCfg)
    train: TrainCfg = Field(default_factory=TrainCfg)
    federation: FederationCfg = Field(default_factory=FederationCfg)
    methods: list[MethodCfg] = Field(min_length=1)

    @field_validator("seeds")
    @classmethod
    def _seeds_in_range_and_distinct(cls, seeds: list[int]) -> list[int]:
        bad = [s for s in seeds if not 0 <= s < SEED_LIMIT]
        if bad:
            raise ValueError(f"seeds {bad} are out of range: a seed is an integer from 0 to 2**32 - 1 "
                             f"(numpy's RandomState)")
        _refuse_repeats(seeds, "seed", "a repeated seed reruns the same run and fakes a spread of ± 0.00")
        return seeds

    @model_validator(mode="after")
    def _no_held_out_domain_in_multidomain(self) -> ExperimentCfg:
        if self.protocol == "multidomain" and self.data.targets != "all":
            raise ValueError(f"data.targets {self.data.targets} names held-out domains, but protocol multidomain "
                             f"holds none out (every domain is a client, tested on its own test split): remove "
                             f"data.targets, or choose protocol lodo")
        return self

    @model_validator(mode="after")
    def _distinct_labels(self) -> ExperimentCfg:
        labels = [method_label(m) for m in self.methods]
        repeated = sorted({x for x in labels if labels.count(x) > 1})
        if repeated:
            raise ValueError(f"two methods share the label {repeated}: give each a distinct `label`")
        return self


def _refuse_repeats(values: list, what: str, why: str) -> None:
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise ValueError(f"{what} {', '.join(map(str, repeated))} is listed more than once ({why}): list each once")


def add_method_config(cfg_cls: type[BaseModel]) -> None:
    """Makes a method config defined outside this module (a plugin's, a test's) valid in `methods`. Methods of
    the package are listed in `_METHOD_CFGS` instead; `trip.methods.register` calls this."""
    if cfg_cls in _METHOD_CFGS:
        return
    _METHOD_CFGS.append(cfg_cls)
    ExperimentCfg.model_fields["methods"].annotation = list[_method_union()]
    ExperimentCfg.model_rebuild(force=True)


def load_plugins() -> None:
    """Imports the modules named in $TRIP_PLUGINS (comma-separated), which register their methods: every process
    of a run (Flower SuperNodes, ServerApps) parses the same configs this way."""
    for name in filter(None, (m.strip() for m in os.environ.get("TRIP_PLUGINS", "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise TripError(f"TRIP_PLUGINS names {name!r}, which cannot be imported ({err}): fix PYTHONPATH or "
                            f"the variable") from None


def method_label(method: Any) -> str:
    return method.label or method.name


def parse_config(raw: dict[str, Any], source: str = "config") -> ExperimentCfg:
    load_plugins()
    try:
        return ExperimentCfg.model_validate(raw)
    except ValidationError as err:
        raise TripError(f"invalid {source}:\n" + _explain(err)) from None


def _explain(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"] if not _is_union_tag(p))
        if e["type"] == "extra_forbidden":
            lines.append(f"  unknown key '{key}': remove it or check its spelling")
        elif e["type"] == "value_error":  # our validators' messages name the values themselves
            reason = str(e["ctx"]["error"])
            lines.append(f"  key '{key}': {reason}" if key else f"  {reason}")
        else:
            lines.append(f"  key '{key}': {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def _is_union_tag(part: Any) -> bool:
    return any(part in typing.get_args(c.model_fields["name"].annotation) for c in _METHOD_CFGS)


def load_config(path: str | Path, overrides: list[str] = ()) -> ExperimentCfg:
    path = Path(path)
    raw = read_yaml(path, "config") or {}
    if not isinstance(raw, dict):
        raise TripError(f"{path} must hold a mapping of config keys at the top level")
    for item in overrides:
        apply_override(raw, item)
    return parse_config(raw, source=str(path))


def read_yaml(path: Path, what: str) -> Any:
    """The YAML document in `path`; a folder, a missing file, bytes that are not UTF-8 or a syntax error end in
    a TripError naming the cause and where."""
    if path.is_dir():
        hint = f"; did you mean {path / 'config.yaml'}?" if (path / "config.yaml").is_file() else ""
        raise TripError(f"{path} is a folder, not a {what} file: pass the YAML file itself{hint}")
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise TripError(f"{what} file not found: {path}") from None
    except OSError as err:
        raise TripError(f"cannot read the {what} file {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise TripError(f"{path} is not UTF-8 text (byte {err.start} is {err.object[err.start]:#04x}): "
                        f"save the {what} file as UTF-8") from None
    return _parse_yaml(text, str(path))


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise TripError(f"{where} is not valid YAML: {problem}{at}; fix the syntax there") from None


def apply_override(raw: dict[str, Any], item: str) -> None:
    """`--set train.rounds=3` or `--set methods.1.n_ctx=8`: the value is read as YAML."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise TripError(f"--set expects key=value, got {item!r}")
    *parents, last = key.split(".")
    node: Any = raw
    for depth, part in enumerate(parents):
        node = _child(node, part, key, ".".join(parents[:depth + 1]))
    parsed = _parse_yaml(value, f"the value of --set {key}")
    if isinstance(node, list):
        node[_index(node, last, key)] = parsed
    else:
        node[last] = parsed


def _child(node: dict | list, part: str, key: str, path: str) -> dict | list:
    """The mapping or list at `part` of `node` (an empty mapping where the config has nothing there yet)."""
    if isinstance(node, list):
        child = node[_index(node, part, key)]
    else:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
    if not isinstance(child, dict | list):
        raise TripError(f"--set {key}: '{path}' is the value {child!r}, which has no keys inside; "
                        f"set '{path}' itself (--set {path}=VALUE) or check the key's spelling")
    return child


def _index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise TripError(f"--set {key}: '{part}' is not an index of a list of {len(node)} items")
    return int(part)


def dump_config(cfg: ExperimentCfg) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)

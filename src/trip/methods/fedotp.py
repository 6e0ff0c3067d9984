"""FedOTP (Li et al., CVPR 2024), as its official code trains it: every client has a global and a local 16-token
CoOp prompt (shared by all classes); an image's patch tokens are matched to the two prompts' text features of a
class by entropic optimal transport (`trip.ot.transport_plan`, the plan a constant), and the class logit is
logit_scale · Σ T·cos. Only the global prompt is averaged (8,192 parameters per round at text width 512); the local
prompt is private. The held-out domain is predicted as `target_mode` says (docs/reproduce.md "FedOTP")."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trip.backbone import autocast
from trip.features import Inputs
from trip.methods.base import Method, Split, Tensors, gaussian_init
from trip.ot import transport_plan
from trip.textenc import build_prompt_tokens, encode_prompts

UPLOADS_LOCAL = ("global_plus_mean_local", "source_ensemble")


class FedOTP(Method):
    eval_batch_size = 100  # the OT stops on the mean change over the batch: CoOp-style test batches of 100
    # A class's logit depends on the others only through that stopping rule: scored among a split's classes
    # (Split.classes), it is the logit of FedOTP built on that class list.
    novel_classes = True

    def __init__(self, cfg, backbone, class_names):
        super().__init__(cfg, backbone, class_names)
        self.tokens = build_prompt_tokens(backbone.model, backbone.tokenizer, class_names, cfg.n_ctx)

    @staticmethod
    def count_params(cfg, text_width: int, vision_width: int, classes: int) -> int:
        return cfg.n_ctx * text_width

    @staticmethod
    def count_upload(cfg, text_width: int, vision_width: int, classes: int) -> int:
        # global_plus_init's local prompt is the untrained init, a function of the run's seed the server knows.
        return cfg.n_ctx * text_width if cfg.target_mode in UPLOADS_LOCAL else 0

    def inputs(self) -> Inputs:
        return Inputs(patches=True)

    def _init(self, seed: int) -> torch.Tensor:
        """[2, n_ctx, W]: the official code's one `ctx` tensor (global, local); every client starts from it."""
        return gaussian_init((2, self.cfg.n_ctx, self.backbone.text_width), seed, self.backbone.device)

    def init_params(self, seed: int) -> Tensors:
        return {"global": self._init(seed)[0]}

    def init_private(self, seed: int, client: int, clients: int) -> Tensors:
        local = self._init(seed)[1]
        # The untrained local prompt is kept (the loss never reads it, so it gets no gradient) for PMFLT's target.
        return {"local": local} | ({"local_init": local.clone()} if self.cfg.target_mode == "global_plus_init" else {})

    def target_upload(self, private: Tensors) -> Tensors:
        mode = self.cfg.target_mode
        if mode == "global_plus_init":
            return {"local": private["local_init"]}
        return {"local": private["local"]} if mode in UPLOADS_LOCAL else {}

    def target_model(self, shared: Tensors, uploads: list[Tensors]) -> Tensors:
        if self.cfg.target_mode == "global_only":
            return {"global": shared["global"]}
        if self.cfg.target_mode == "global_plus_init":  # every client's init is the same tensor
            return {"global": shared["global"], "local": uploads[0]["local"]}
        locals_ = torch.stack([u["local"] for u in uploads])
        if self.cfg.target_mode == "source_ensemble":
            return {"global": shared["global"], "locals": locals_}
        return {"global": shared["global"], "local": locals_.mean(0)}

    def personal_model(self, shared: Tensors, private: Tensors) -> Tensors:
        """The client's own model, as it trains and as FedOTP's paper tests it: the global and its local prompt."""
        return {"global": shared["global"], "local": private["local"]}

    def loss(self, params: Tensors, batch: Split) -> torch.Tensor:
        return F.cross_entropy(self.logits({"global": params["global"], "local": params["local"]}, batch),
                               batch.labels)

    def logits(self, params: Tensors, batch: Split) -> torch.Tensor:
        patches = F.normalize(batch["patches"].float(), dim=-1)  # [B, M, E]
        if "locals" in params:  # source_ensemble: the mean logits of the K personalised models [G, L_k]
            text = self._text(torch.cat([params["global"][None], params["locals"]]), batch)  # [1 + K, C, E]
            return torch.stack([self._ot_logits(patches, text[[0, k]]) for k in range(1, len(text))]).mean(0)
        prompts = [params["global"]] + ([params["local"]] if "local" in params else [])
        return self._ot_logits(patches, self._text(torch.stack(prompts), batch))

    def _text(self, ctx: torch.Tensor, batch: Split) -> torch.Tensor:
        """[N, C, E] L2-normalised text features of N prompts over the batch's classes, once per batch."""
        with autocast(self.backbone.device):  # bf16 text encoder on GPU; fp32 (a no-op) on CPU
            text = encode_prompts(self.backbone.model, batch.columns(self.tokens), ctx)
        return F.normalize(text.float(), dim=-1)

    def _ot_logits(self, patches: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """logit[b, c] = logit_scale · Σ_{m,n} T[m, n] cos(patch_m, text_{n,c}), one OT problem per (b, c)."""
        sim = torch.einsum("bme,nce->bcmn", patches, text)  # [B, C, M, N]
        cfg = self.cfg
        plan = transport_plan(sim.flatten(0, 1), variant=cfg.ot, gamma=cfg.gamma, eps=cfg.eps,
                              max_iters=cfg.max_iters, tol=cfg.tol)
        return self.backbone.logit_scale * (plan.view_as(sim) * sim).sum((-2, -1))

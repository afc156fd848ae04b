"""saml's mixture of LoRA experts on the NF4 model: load the experts and the router, route, merge.

Stage 6 (:mod:`pqm.saml`) makes ``<saml>/groups.json`` (expert -> training speakers), the experts
``<saml>/experts/<expert>`` (peft folders) and the router ``<saml>/router.safetensors`` with
``<saml>/router.json``. This module is what reads them: stage 8's ``saml`` system routes each utterance
through a :class:`Mixture`; stage 7's ``saml_sa`` starts a speaker's adapter from the experts merged at
the speaker's mean routing weights (:meth:`Mixture.merged`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import ModuleType

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from pqm.errors import BadInput, require
from pqm.files import file_digest, read_json
from pqm.lora import adapter_window, load_adapter, merge_adapters

GROUPS, ROUTER, ROUTER_META = "groups.json", "router.safetensors", "router.json"
MADE_BY = "stage 6 with --saml-experts > 0 (python -m pqm.saml)"


def base_net(model: torch.nn.Module) -> torch.nn.Module:
    """The model under peft's wrapper (itself where there is none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@torch.no_grad()
def encoder_means(rec, models: ModuleType, cuts: list, desc: str, peft_model=None) -> torch.Tensor:
    """Each cut's mean encoder output (the family ``models``' ``encoder_mean``) of the recognizer's model
    without adapters (``peft_model``: the peft wrapper of the model, whose adapters are then disabled),
    one cut at a time, (cuts, dim)."""
    net = base_net(rec.model)
    with peft_model.disable_adapter() if peft_model is not None else contextlib.nullcontext():
        return torch.cat([models.encoder_mean(net, rec.inputs([cut]))
                          for cut in tqdm(cuts, desc=desc, unit="utt", mininterval=5)])


def expert_dirs(saml_dir: Path) -> dict[str, Path]:
    """Each expert's adapter folder, by name, in ``groups.json``'s order."""
    return {name: saml_dir / "experts" / name for name in read_json(saml_dir / GROUPS, MADE_BY)["experts"]}


def mixture_key(saml_dir: Path) -> dict:
    """What determines the mixture: the router's weights and the experts' (as the router was trained on)."""
    router = require(saml_dir / ROUTER, MADE_BY)
    return {"router": file_digest(router), "experts": read_json(saml_dir / ROUTER_META)["run_key"]["experts"]}


def mixture_window(saml_dir: Path) -> str:
    """The Whisper input window the experts were trained in (and the mixture decodes in)."""
    return adapter_window(next(iter(expert_dirs(saml_dir).values())))


class Mixture:
    """The experts loaded as adapters of one peft model, all active, and the router that weighs them."""

    def __init__(self, model, saml_dir: Path, base_fingerprint: str, trainable_router: bool = False) -> None:
        experts = expert_dirs(saml_dir)
        self.names = list(experts)
        for name, folder in experts.items():
            model = load_adapter(model, folder, base_fingerprint, name=name)
        self.model = model
        self.activate()
        for p in model.parameters():
            p.requires_grad_(False)
        self.window = mixture_window(saml_dir)
        self.router: torch.nn.Linear | None = None
        if not trainable_router:
            state = load_file(require(saml_dir / ROUTER, MADE_BY))
            self.router = torch.nn.Linear(state["weight"].shape[1], len(self.names))
            self.router.load_state_dict(state)
            if read_json(saml_dir / ROUTER_META)["experts"] != self.names:
                raise BadInput(f"{saml_dir / ROUTER} was trained for other experts: rerun stage 6")

    def activate(self) -> None:
        """Every expert active; :class:`pqm.lora.RowAdapters` weighs them per row."""
        self.model.base_model.set_adapter(self.names)

    def rows(self, weights: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Per-row mixtures for :class:`pqm.lora.RowAdapters` from a (rows, experts) weight matrix."""
        return [dict(zip(self.names, row)) for row in weights]

    def weights(self, means: torch.Tensor, held_out: torch.Tensor | None = None) -> torch.Tensor:
        """The router's softmax over the experts of each row's mean encoder output; experts that
        ``held_out`` (a bool per expert) marks get weight 0 (training with ``--hold-out-own-expert``)."""
        logits = self.router(means)
        if held_out is not None:
            logits = logits.masked_fill(held_out.to(logits.device), float("-inf"))
        return torch.softmax(logits, -1)

    @torch.no_grad()
    def route(self, rec, models: ModuleType, cuts: list) -> list[dict[str, float]]:
        """Each cut's weights over the experts, from its own mean NF4 encoder output (family ``models``)."""
        weights = self.weights(encoder_means(rec, models, cuts, "route", self.model))
        return [{name: float(w) for name, w in zip(self.names, row)} for row in weights]

    def merged(self, rec, models: ModuleType, cuts: list, name: str = "default") -> dict[str, float]:
        """Merge the experts into one trainable adapter ``name`` at the mean of the router's weights over
        ``cuts`` (audio only: a speaker's adaptation utterances), removing them; returns those weights."""
        rows = self.route(rec, models, cuts)
        mean = {n: sum(r[n] for r in rows) / len(rows) for n in self.names}
        merge_adapters(self.model, mean, name)
        return mean

    @staticmethod
    def size(saml_dir: Path) -> int:
        """Bytes on disk of the experts and the router."""
        files = [folder / "adapter_model.safetensors" for folder in expert_dirs(saml_dir).values()]
        return sum(f.stat().st_size for f in [*files, saml_dir / ROUTER])

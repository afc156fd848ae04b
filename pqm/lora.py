"""LoRA adapters (peft) on the NF4 model, stored in peft's own folder format.

An adapter folder holds peft's ``adapter_config.json`` and
``adapter_model.safetensors`` plus ``pqm_adapter.json``: the fingerprint of
the NF4 base it was trained on, the speaker, how it was initialised and its
parameter count. Loading an adapter onto a base with another fingerprint is
refused.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import bitsandbytes as bnb
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from pqm.errors import BadInput, require
from pqm.files import atomic_path, read_json, write_json

META = "pqm_adapter.json"


class AdapterMismatch(BadInput):
    """An adapter trained on another base model."""


@dataclass
class LoraSettings:
    """LoRA hyper-parameters (ours: the papers do not give them); the target modules (a regex over
    module names) default to the model family's ``DEFAULT_TARGETS``."""

    target_modules: str
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05


def add_lora(model: nn.Module, settings: LoraSettings) -> PeftModel:
    """Wrap ``model`` with a fresh, trainable LoRA adapter named ``default``."""
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        bias="none",
    )
    return get_peft_model(model, config)


INITS = ("zero", "svd")


def linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every ``nn.Linear`` weight of a full-precision model, by module name (before quantisation)."""
    return {name: m.weight.detach().clone() for name, m in model.named_modules() if type(m) is nn.Linear}


@torch.no_grad()
def init_from_quantisation_error(model: PeftModel, fp_weights: dict[str, torch.Tensor], name: str = "default") -> float:
    """Start adapter ``name`` where full precision was: on every LoRA layer over an NF4 Linear, set
    ``B @ A * scaling`` to the best rank-r approximation (SVD) of ``W_fp - dequantise(W_nf4)``.

    This is LoftQ's one-shot form on an already quantised base (peft's ``replace_lora_weights_loftq``, which
    cannot be used here: it computes on CUDA only and ignores the LoRA scaling ``alpha / r``). The NF4 base
    stays the one of stage 5. Returns the share of the quantisation error's energy (squared Frobenius norm,
    summed over the layers) that the adapter removes.
    """
    removed = total = 0.0
    for module_name, module in model.named_modules():
        base = module.get_base_layer() if isinstance(module, LoraLayer) else None
        if not isinstance(base, bnb.nn.Linear4bit) or name not in module.lora_A:
            continue
        key = module_name.removeprefix("base_model.model.")
        if key not in fp_weights:
            raise KeyError(f"no full-precision weight for {key}")
        quantised = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
        error = fp_weights[key].float().to(quantised.device) - quantised
        u, s, vh = torch.linalg.svd(error, full_matrices=False)
        r = module.r[name]
        root = (s[:r] / module.scaling[name]).sqrt()
        module.lora_B[name].weight.copy_(u[:, :r] * root)
        module.lora_A[name].weight.copy_(root[:, None] * vh[:r])
        removed += float((s[:r] ** 2).sum())
        total += float((s ** 2).sum())
    if total == 0.0:
        raise ValueError("no LoRA layer over an NF4 Linear: nothing to initialise from the quantisation error")
    return removed / total


def check_adapter(adapter_dir: Path, base_fingerprint: str) -> dict:
    """Return the adapter's metadata, refusing one made for another base model."""
    meta = read_json(Path(adapter_dir) / META, "stage 6 or 7 (LoRA training)")
    if meta.get("base_fingerprint") != base_fingerprint:
        raise AdapterMismatch(
            f"adapter {adapter_dir} was trained on base model {meta.get('base_fingerprint', '?')[:12]}..., "
            f"but the loaded base is {base_fingerprint[:12]}...: retrain it (stages 6-7) on this base "
            f"or load the base it was made for ({meta.get('base_model', '?')})"
        )
    return meta


BASE_WINDOW = "padded"  # the base model reads Whisper's 30 s window, as it was trained


def adapter_window(adapter: Path | None) -> str:
    """The Whisper input window a starting point decodes in: an adapter's, as it was trained (the 30 s window
    before that was recorded); the bare base model (``None``), its 30 s window."""
    return read_json(Path(adapter) / META).get("window", BASE_WINDOW) if adapter else BASE_WINDOW


def load_adapter(
    model: nn.Module | PeftModel, adapter_dir: Path, base_fingerprint: str, name: str = "default", trainable: bool = False
) -> PeftModel:
    """Load a checked adapter onto ``model`` (a base model or an existing PeftModel) as ``name``."""
    check_adapter(adapter_dir, base_fingerprint)
    require(Path(adapter_dir) / "adapter_model.safetensors", "stage 6 or 7 (LoRA training)")
    if isinstance(model, PeftModel):
        model.load_adapter(str(adapter_dir), adapter_name=name, is_trainable=trainable)
        return model
    return PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=name, is_trainable=trainable)


def merge_adapters(model: PeftModel, weights: dict[str, float], name: str = "default") -> None:
    """Replace the loaded adapters ``weights`` names by one trainable adapter ``name`` whose update is their
    weighted sum, exactly: peft's ``add_weighted_adapter`` with ``combination_type="cat"`` (rank: the sum of
    theirs, ``lora_alpha`` equal to it) makes ``B @ A`` the sum of ``weight * scaling * B_k @ A_k``."""
    names = list(weights)
    model.add_weighted_adapter(names, [float(weights[n]) for n in names], name, combination_type="cat")
    model.base_model.set_adapter(name)
    for n in names:
        model.delete_adapter(n)
    model.train(model.training)  # its new dropout layers in the model's mode
    for param_name, param in model.named_parameters():
        param.requires_grad_(f".{name}." in param_name and "lora_" in param_name)


BASE = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch
Row = str | dict[str, float]  # a row's loaded adapter, or its weights over loaded adapters (a mixture)


class RowAdapters:
    """Each row of a batch through its own loaded LoRA adapter (``BASE``: none), or its own mixture of loaded
    adapters, in one forward pass.

    peft's mixed-adapter batches: its LoRA layers take ``adapter_names``, one per row. peft's own
    ``generate(adapter_names=...)`` fixes that list for the whole call; here it is set per forward pass
    from :attr:`names`, the adapters of the rows being decoded now. A layer that sees ``k`` times as many
    rows (beam search expands each row into ``k`` beams, ``repeat_interleave`` style) repeats each name
    ``k`` times. A decoder that decodes a sub-batch again (Whisper's temperature fallback) sets
    :attr:`names` to that sub-batch's adapters first.

    A row given as ``{adapter: weight}`` (:mod:`pqm.saml`) goes through every adapter of the mixture at
    once, each LoRA layer's output of adapter ``k`` times the row's weight for ``k``: the adapters must be
    the layers' active ones (``set_adapter([...])``), and their ``scaling`` is set per forward pass and
    restored on exit.
    """

    def __init__(self, model: nn.Module, names: list[Row]) -> None:
        self._layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        self._scaling = {id(m): dict(m.scaling) for m in self._layers}
        self._adapters = {adapter for scaling in self._scaling.values() for adapter in scaling}
        self.names = names
        self._handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True) for m in self._layers]
        if not self._handles:
            raise BadInput("per-utterance adapters need a model with LoRA layers (load an adapter first)")

    @property
    def names(self) -> list[Row]:
        return self._names

    @names.setter
    def names(self, names: list[Row]) -> None:
        """The rows' adapters; a mixture's weights are stacked here, once, for every layer's hook (weight 0
        for a loaded adapter outside the mixture)."""
        self._names = list(names)
        mixtures = [row for row in self._names if not isinstance(row, str)]
        if mixtures and len(mixtures) != len(self._names):
            raise ValueError("the rows of one batch are either adapter names or mixtures, not both")
        self._weights = {adapter: torch.stack([torch.as_tensor(row.get(adapter, 0.0)) for row in mixtures])
                         for adapter in self._adapters} if mixtures else None

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        rows = args[0].shape[0]
        if not self.names or rows % len(self.names):
            raise RuntimeError(f"a batch of {rows} rows for {len(self.names)} utterances' adapters")
        repeat = rows // len(self.names)
        if self._weights is None:
            return args, {**kwargs, "adapter_names": [name for name in self.names for _ in range(repeat)]}
        shape = (rows,) + (1,) * (args[0].dim() - 1)
        for adapter, scaling in self._scaling[id(module)].items():
            weights = self._weights[adapter].to(dtype=args[0].dtype, device=args[0].device)  # keeps a router's graph
            module.scaling[adapter] = scaling * weights.repeat_interleave(repeat).view(shape)
        return args, kwargs

    def __enter__(self) -> "RowAdapters":
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        for module in self._layers:
            module.scaling.update(self._scaling[id(module)])


@contextmanager
def per_row(model: nn.Module, adapters: list[Row] | None) -> Iterator[RowAdapters | None]:
    """:class:`RowAdapters` on ``model`` (names set by the decoder) when ``adapters`` are given, else None."""
    if adapters is None:
        yield None
        return
    with RowAdapters(model, []) as rows:
        yield rows


def save_adapter(model: PeftModel, out_dir: Path, meta: dict) -> None:
    """Save the ``default`` adapter in peft's format plus ``pqm_adapter.json``, atomically."""
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(str(tmp), selected_adapters=["default"])
        write_json(tmp / META, meta)


def trainable_params(model: nn.Module) -> int:
    """Number of trainable parameters (the LoRA weights)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

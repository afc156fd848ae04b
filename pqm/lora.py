"""LoRA adapters (peft) on the NF4 model, stored in peft's own folder format.

An adapter folder holds peft's ``adapter_config.json`` and
``adapter_model.safetensors`` plus ``pqm_adapter.json``: the fingerprint of
the NF4 base it was trained on, the speaker, how it was initialised and its
parameter count. Loading an adapter onto a base with another fingerprint is
refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
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


def save_adapter(model: PeftModel, out_dir: Path, meta: dict) -> None:
    """Save the ``default`` adapter in peft's format plus ``pqm_adapter.json``, atomically."""
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(str(tmp), selected_adapters=["default"])
        write_json(tmp / META, meta)


def trainable_params(model: nn.Module) -> int:
    """Number of trainable parameters (the LoRA weights)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

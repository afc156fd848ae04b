"""Model families: the code that builds, trains, decodes and scores each kind of model.

``conformer``: an ESPnet Conformer AED (``pqm.model_io``); ``whisper``: a
transformers Whisper model (``pqm.whisper``). A model folder made by stage 4
says which it is: Whisper folders hold ``config.json`` with ``model_type:
whisper``, ESPnet ones ``config.yaml``. The stages after 4 ask this module and
stay the same for both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch
from lhotse import CutSet

from pqm import model_io, whisper
from pqm.batches import iterate_batches

FAMILIES = ("conformer", "whisper")


def family_of(fp_dir: Path) -> str:
    return "whisper" if whisper.is_whisper_dir(fp_dir) else "conformer"


def build_model(fp_dir: Path, device: str = "cpu") -> torch.nn.Module:
    """The full-precision model of ``fp_dir``, for quantisation and LoRA training."""
    if family_of(fp_dir) == "whisper":
        return whisper.build_model(fp_dir, device)
    return model_io.build_model(fp_dir, device=device)


def omitted_keys(fp_dir: Path, model: torch.nn.Module) -> set[str]:
    """State-dict keys the NF4 file can leave out: the model restores them when built (or tied)."""
    if family_of(fp_dir) == "whisper":
        return whisper.tied_keys(model)
    return model_io.rebuilt_buffers(fp_dir, model)


def keep_full_precision(fp_dir: Path, embeddings: bool = False) -> list[str]:
    """Modules NF4 leaves alone (Whisper: see ``pqm.whisper.KEEP_FULL_PRECISION``)."""
    if family_of(fp_dir) != "whisper":
        return []
    return [m for m in whisper.KEEP_FULL_PRECISION if not (embeddings and m == whisper.TIED_OUTPUT)]


def embedding_modules(fp_dir: Path) -> list[str]:
    """Token embeddings that ``--embeddings true`` quantises (with the output projection tied to them)."""
    if family_of(fp_dir) == "whisper":
        return [whisper.TOKEN_EMBEDDING]
    raise ValueError("embedding quantisation is available for Whisper models only")


def default_lora_targets(fp_dir: Path) -> str:
    """LoRA target modules (a regex) when none are given: q/v self-attention (ESPnet), q/k/v/out_proj + fc1/fc2 (Whisper)."""
    from pqm.lora import DEFAULT_TARGETS

    return whisper.DEFAULT_TARGETS if family_of(fp_dir) == "whisper" else DEFAULT_TARGETS


def batch_iterator(fp_dir: Path, window: str = "trimmed") -> Callable[..., Iterator[dict[str, torch.Tensor]]]:
    """``iterate(cuts, batch_size, epoch, seed, rank, world_size)`` yielding keyword arguments of the model's forward
    (Whisper: input features in ``window``, see ``pqm.whisper.features``)."""
    if family_of(fp_dir) == "whisper":
        return whisper.batch_iterator(fp_dir, window)
    tokenizer = model_io.token_encoder(fp_dir)

    def iterate(cuts: CutSet, batch_size: int, epoch: int = 0, seed: int = 0, rank: int = 0, world_size: int = 1):
        return iterate_batches(cuts, tokenizer, batch_size, epoch=epoch, seed=seed, rank=rank, world_size=world_size)

    return iterate


def recognizer(fp_dir: Path, device: str, beam_size: int, ctc_weight: float):
    """An object with ``.model`` (adapted and quantised in place), ``.transcribe(cuts, desc)`` and
    ``.set_window(window)`` (the Whisper input window; the Conformer reads whole utterances)."""
    if family_of(fp_dir) == "whisper":
        return whisper.WhisperRecognizer(fp_dir, device=device, beam_size=beam_size)
    return model_io.EspnetRecognizer(fp_dir, device=device, beam_size=beam_size, ctc_weight=ctc_weight)


def decoding_settings(fp_dir: Path) -> dict:
    """Decoding settings fixed by the family (beyond beam size and CTC weight), for stage 8's run key."""
    return dict(whisper.DECODING) if family_of(fp_dir) == "whisper" else {}


def text_normaliser(family: str, fp_dir: Path | None = None) -> Callable[[str], str]:
    """How references and hypotheses are normalised before scoring (the same for every system)."""
    if family == "whisper":
        return whisper.text_normaliser(fp_dir)
    return lambda text: " ".join(text.split())

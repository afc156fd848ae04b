"""Stages 6 and 7: train a LoRA adapter on the frozen NF4 model.

Stage 6 (SAT) trains one adapter on every training speaker. Stage 7 trains one
adapter per test speaker on that speaker's adaptation utterances, starting
from the SAT adapter (``--init``) for ``pqm`` or from scratch for the
``nf4_sa`` ablation. A speaker without adaptation data gets no adapter but a
``fallback.json`` that says so; decoding then uses the SAT adapter (``pqm``)
or the bare NF4 model (``nf4_sa``) and the results mark the speaker.

Training state is checkpointed after every epoch (``.<out>.checkpoint``), so a
killed job resumes where it stopped; an adapter already trained with the same
inputs and settings (``run_key`` in ``pqm_adapter.json``) is not trained again,
so rerunning a stage redoes only the speakers whose jobs failed.

Started by ``torchrun`` (``WORLD_SIZE`` > 1), training is data-parallel with
PyTorch's DistributedDataParallel over the LoRA parameters only (NCCL on GPUs,
gloo on CPUs); rank 0 writes checkpoints and the adapter.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from lhotse import CutSet
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from pqm.families import batch_iterator, build_model, default_lora_targets
from pqm.fsutil import (
    atomic_path, check_safe_id, cli, file_digest, ids_digest, read_json, require, setup_logging, write_json,
)
from pqm.lora import META, LoraSettings, add_lora, load_adapter, save_adapter, trainable_params
from pqm.model_io import to_nf4
from pqm.nf4 import count_params


def freeze_batchnorm(model: torch.nn.Module) -> None:
    """Keep BatchNorm running statistics fixed: they belong to the base, not the adapter."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> tuple[Ranks, str]:
    """Join torchrun's process group if started by torchrun; return the ranks and this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Ranks(), device
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device, backend = f"cuda:{local_rank}", "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend)
    logging.info(f"rank {dist.get_rank()} of {world_size} ({backend}) on {device}")
    return Ranks(dist.get_rank(), world_size), device


def data_parallel(model: torch.nn.Module, device: str) -> DistributedDataParallel:
    """Wrap ``model`` in DDP that synchronises only the trainable (LoRA) parameters."""
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    ids = [torch.device(device).index] if device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=ids)


def run_key(a: argparse.Namespace, speaker: str | None, cuts: CutSet, world_size: int = 1) -> dict:
    """Everything that determines an adapter: equal keys mean equal training runs."""
    nf4_meta = read_json(a.nf4_dir / "nf4.json", "stage 5 (NF4 quantisation)")
    init = file_digest(require(a.init / "adapter_model.safetensors", "stage 6 (SAT)")) if a.init else None
    utts = ids_digest(c.id for c in cuts)
    return {
        "base_fingerprint": nf4_meta["fingerprint"], "init_digest": init, "speaker": speaker, "utterances": utts,
        "epochs": a.epochs, "lr": a.lr, "batch_size": a.batch_size, "seed": a.seed, "lora_r": a.lora_r,
        "lora_alpha": a.lora_alpha, "lora_dropout": a.lora_dropout, "lora_targets": a.lora_targets,
        "world_size": world_size,
    }


class Checkpoint:
    """Per-epoch training state in ``<dir>``, written atomically, for resuming a killed run."""

    def __init__(self, path: Path, key: dict) -> None:
        self.path, self.key = path, key

    def save(self, model, optim: torch.optim.Optimizer, epoch: int, losses: list[float]) -> None:
        with atomic_path(self.path) as tmp:
            tmp.mkdir()
            save_file({k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}, str(tmp / "lora.safetensors"))
            torch.save({"optim": optim.state_dict(), "rng": torch.get_rng_state()}, tmp / "optim.pt")
            write_json(tmp / "state.json", {"key": self.key, "epoch": epoch, "losses": losses})

    def load(self, model, optim: torch.optim.Optimizer) -> tuple[int, list[float]]:
        """Restore the state of a matching checkpoint; return (epochs done, losses)."""
        state_file = self.path / "state.json"
        if not state_file.exists():
            return 0, []
        state = read_json(state_file)
        if state["key"] != self.key:
            logging.info(f"ignoring checkpoint {self.path}: it was made with other inputs or settings")
            return 0, []
        set_peft_model_state_dict(model, load_file(str(self.path / "lora.safetensors")))
        extra = torch.load(self.path / "optim.pt", weights_only=True)
        optim.load_state_dict(extra["optim"])
        torch.set_rng_state(extra["rng"])
        logging.info(f"resuming from {self.path} after epoch {state['epoch']}")
        return state["epoch"], state["losses"]

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def train_adapter(
    model, cuts: CutSet, batches_of, epochs: int, lr: float, batch_size: int, seed: int,
    device: str = "cpu", checkpoint: Checkpoint | None = None, ranks: Ranks = Ranks(),
) -> list[float]:
    """Train the trainable (LoRA) parameters of ``model``; return the mean loss per epoch.

    ``batches_of(cuts, batch_size, epoch, seed, rank, world_size)`` gives the
    keyword arguments of the model's forward, whose first output is the loss
    (:func:`pqm.families.batch_iterator`).

    With ``checkpoint``, the state is saved after every epoch and a matching
    saved state is resumed from. With ``ranks.world_size`` > 1 (torchrun),
    each rank trains on its share of the batches and DDP averages the gradients.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    done, losses = checkpoint.load(model, optim) if checkpoint else (0, [])
    net = data_parallel(model, device) if ranks.world_size > 1 else model
    for epoch in range(done, epochs):
        model.train()
        freeze_batchnorm(model)
        sums = torch.zeros(2, dtype=torch.float64)  # loss total, batches
        batches = batches_of(cuts, batch_size, epoch=epoch, seed=seed, rank=ranks.rank, world_size=ranks.world_size)
        for batch in tqdm(batches, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", mininterval=5,
                          disable=not ranks.main):
            loss = net(**{k: v.to(device) for k, v in batch.items()})[0]
            optim.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            optim.step()
            sums += torch.tensor([loss.item(), 1.0], dtype=torch.float64)
        if ranks.world_size > 1:
            sums = sums.to(device)
            dist.all_reduce(sums)
        total, count = sums.tolist()
        losses.append(total / max(count, 1))
        logging.info(f"epoch {epoch + 1}: mean loss {losses[-1]:.3f} over {count:.0f} batches")
        if checkpoint and ranks.main:
            checkpoint.save(model, optim, epoch + 1, losses)
    model.eval()
    return losses


def main(argv: list[str] | None = None) -> None:
    default = LoraSettings()
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--fp-dir", type=Path, required=True, help="full-precision model (stage 4)")
    p.add_argument("--nf4-dir", type=Path, required=True, help="NF4 model (stage 5)")
    p.add_argument("--cuts", type=Path, required=True, help="lhotse cuts to train on")
    p.add_argument("--out", type=Path, required=True, help="adapter folder to write")
    p.add_argument("--speaker", default=None, help="train on this speaker's cuts only")
    p.add_argument("--speaker-list", type=Path, default=None, help="with --job N: take line N of this file as --speaker")
    p.add_argument("--job", type=int, default=None)
    p.add_argument("--init", type=Path, default=None, help="adapter to start from (the SAT adapter); default: new LoRA")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-utts", type=int, default=0, help="use at most this many utterances (0: all)")
    p.add_argument("--lora-r", type=int, default=default.r)
    p.add_argument("--lora-alpha", type=int, default=default.alpha)
    p.add_argument("--lora-dropout", type=float, default=default.dropout)
    p.add_argument("--lora-targets", default=None, help="regex over module names (default: the model family's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    if a.speaker_list is not None and a.job is None:
        p.error("--speaker-list needs --job")
    setup_logging()
    a.lora_targets = a.lora_targets or default_lora_targets(a.fp_dir)
    ranks, a.device = init_distributed(a.device)
    try:
        train_job(a, ranks)
    finally:
        if ranks.world_size > 1:
            dist.destroy_process_group()


def train_job(a: argparse.Namespace, ranks: Ranks) -> None:
    """Train (or skip, or mark as fallback) the adapter that ``a`` describes."""
    torch.manual_seed(a.seed)
    speaker = a.speaker
    out = a.out
    if a.speaker_list is not None:
        speakers = require(a.speaker_list).read_text(encoding="utf-8").split()
        speaker = speakers[a.job - 1]
        out = out / check_safe_id(speaker)
    cuts = CutSet.from_file(require(a.cuts, "stage 2 (manifests)"))
    if speaker is not None:
        check_safe_id(speaker)
        cuts = cuts.filter(lambda c: c.supervisions[0].speaker == speaker).to_eager()
    if a.max_utts:
        cuts = cuts.subset(first=min(a.max_utts, len(cuts)))
    if len(cuts) == 0:
        logging.warning(f"speaker {speaker}: no adaptation data in {a.cuts}; falling back (see {out}/fallback.json)")
        if ranks.main:
            write_json(out / "fallback.json", {"speaker": speaker, "reason": f"no adaptation utterances in {a.cuts}"})
        return
    key = run_key(a, speaker, cuts, ranks.world_size)
    if (out / META).exists() and read_json(out / META).get("run_key") == key:
        logging.info(f"{out} was already trained with these inputs and settings: nothing to do")
        return
    if ranks.main:
        (out / "fallback.json").unlink(missing_ok=True)
    batches_of = batch_iterator(a.fp_dir)
    start = time.time()
    model = build_model(a.fp_dir, device=a.device)
    base_params = count_params(model)
    base_fp = to_nf4(model, a.nf4_dir, device=a.device)
    if a.init is not None:
        model = load_adapter(model, a.init, base_fp, trainable=True)
    else:
        model = add_lora(model, LoraSettings(a.lora_r, a.lora_alpha, a.lora_dropout, a.lora_targets))
    n_lora = trainable_params(model)
    logging.info(f"training {n_lora} LoRA parameters ({100 * n_lora / base_params:.2f}% of {base_params}) on {len(cuts)} utterances")
    checkpoint = Checkpoint(out.parent / f".{out.name}.checkpoint", key)
    losses = train_adapter(model, cuts, batches_of, a.epochs, a.lr, a.batch_size, a.seed, a.device, checkpoint, ranks)
    if not ranks.main:
        return
    save_adapter(
        model,
        out,
        {
            "base_fingerprint": base_fp,
            "base_model": str(a.nf4_dir),
            "speaker": speaker,
            "init": str(a.init) if a.init else None,
            "utterances": len(cuts),
            "epochs": a.epochs,
            "lr": a.lr,
            "loss_per_epoch": losses,
            "lora_params": n_lora,
            "base_params": base_params,
            "seconds": round(time.time() - start, 1),
            "world_size": ranks.world_size,
            "run_key": key,
        },
    )
    checkpoint.remove()
    logging.info(f"wrote adapter {out}")


if __name__ == "__main__":
    cli(main)

"""Stages 6 and 7: train a LoRA adapter on the frozen NF4 model.

Stage 6 (SAT) trains one adapter on every training speaker. Stage 7 trains one
adapter per test speaker on that speaker's adaptation utterances, starting
from the SAT adapter (``--init``) for ``pqm`` or from scratch for the
``nf4_sa`` ablation. A speaker without adaptation data gets no adapter but a
``fallback.json`` that says so; decoding then uses the SAT adapter (``pqm``)
or the bare NF4 model (``nf4_sa``) and the results mark the speaker.

Do no harm (``--holdout N``): the last N adaptation utterances of the speaker
(by id) are held out of training and decoded after every epoch; the adapter
of the epoch with the fewest word errors there is kept, and only if it makes
no more errors than the adapter it started from (the SAT adapter, or none).
Otherwise the job writes ``fallback.json`` and decoding uses the starting
point (``nf4_sat`` for ``pqm``, ``nf4`` for ``nf4_sa``); ``pqm_adapter.json``
or ``fallback.json`` records the errors of every epoch. The starting point is
decoded as stage 8 decodes it (Whisper without an adapter: the 30 s window,
whatever ``--window`` the new adapter trains in). With ``--targets pseudo`` no
transcript is read there either: the held-out audio is decoded once by the
starting adapter, and each epoch is judged by its training loss per token of
those hypotheses (:func:`held_out_pseudo_loss`), kept only if no higher than
the starting adapter's own.

Targets (``--target-style``, Whisper): references restyled into the model's
own writing (``pqm.restyle``), with the full-precision model's hypotheses of
the training utterances (greedy, 30 s window) where the style needs them.
``--targets pseudo`` (``pqm_unsup``) never reads the transcripts: the targets
are the starting model's own most confident hypotheses (``pqm.pseudo_labels``;
with ``--pseudo-token-floor P``, their tokens below probability P masked out of
the loss), or with ``--pseudo-saml`` those of ``saml`` (:func:`saml_labeller`);
the held-out judge's references then come from ``saml`` too. With
``--pseudo-prior-iters N`` the labeller decodes under a per-speaker token bias
estimated in N iterations towards the token prior of ``--pseudo-prior-cuts``
(the training transcripts; :func:`pqm.pseudo_labels.prior_bias`), and the kept
adapter gets a bias of its own the same way, under which stage 8 decodes the
speaker (``decode_token_bias`` in ``pqm_adapter.json``).

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
import math
import os
import resource
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from lhotse import CutSet
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

from pqm.batches import cut_batches, speed_perturbed
from pqm.errors import BadInput, cli, require, setup_logging
from pqm.families import family, family_of
from pqm.files import atomic_path, file_digest, ids_digest, read_json, write_json
from pqm.jobs import add_speaker_options, job_speakers
from pqm.lora import (BASE_WINDOW, INITS, META, LoraSettings, adapter_window, add_lora, init_from_quantisation_error, linear_weights,
                      load_adapter, save_adapter, trainable_params)
from pqm.mixture import Mixture, mixture_key, mixture_window
from pqm.nf4 import count_params, to_nf4
from pqm.recipes import split_digits
from pqm.pseudo_labels import prior_bias, pseudo_labelled, target_loss, token_counts, with_text
from pqm.restyle import STYLES, restyle
from pqm.score import count_errors


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
    init = (file_digest(require(a.init / "adapter_model.safetensors", "stage 6 (SAT)")) if a.init
            else mixture_key(a.init_saml) if a.init_saml else None)
    utts = ids_digest(c.id for c in cuts)
    return {
        "base_fingerprint": nf4_meta["fingerprint"], "init_digest": init, "speaker": speaker, "utterances": utts,
        "epochs": a.epochs, "lr": a.lr, "batch_size": a.batch_size, "seed": a.seed, "lora_r": a.lora_r,
        "lora_alpha": a.lora_alpha, "lora_dropout": a.lora_dropout, "lora_targets": a.lora_targets,
        "world_size": world_size, "window": a.window, "target_style": a.target_style, "holdout": a.holdout,
        "lora_init": None if a.init or a.init_saml else a.lora_init,
        **({"targets": "pseudo", "pseudo_keep": a.pseudo_keep} if a.targets == "pseudo" else {}),
        **({"pseudo_labeller": mixture_key(a.pseudo_saml)} if a.targets == "pseudo" and a.pseudo_saml else {}),
        **({"pseudo_rounds": a.pseudo_rounds} if a.targets == "pseudo" and a.pseudo_rounds > 1 else {}),
        **({"pseudo_token_floor": a.pseudo_token_floor} if a.targets == "pseudo" and a.pseudo_token_floor else {}),
        **({"pseudo_prior_iters": a.pseudo_prior_iters, "pseudo_prior": file_digest(a.pseudo_prior_cuts),
            "decode_token_bias": True}
           if a.targets == "pseudo" and a.pseudo_prior_iters else {}),
        **({"lr_schedule": a.lr_schedule, "warmup_ratio": a.warmup_ratio} if a.lr_schedule != "constant" else {}),
        **({"max_duration": a.max_duration} if a.max_duration > 0 else {}),
        **({"speed_perturb": a.speed_perturb} if a.speed_perturb else {}),
        # a new LoRA's epoch 0 is the bare model, decoded in its 30 s window (held_out_errors)
        **({"held_out_epoch0_window": BASE_WINDOW} if a.holdout and not (a.init or a.init_saml) and a.window != BASE_WINDOW
           else {}),
    }


def lora_state(model) -> dict[str, torch.Tensor]:
    """A detached copy of the trainable adapter's weights."""
    return {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}


class Selection:
    """Do no harm: a score of the held-out utterances after every epoch (epoch 0: the starting point), lower
    is better, and the weights of the best epoch so far (ties go to the later epoch). ``evaluate(epoch)``
    gives (score, what it counts): word errors and reference words (:func:`held_out_errors`), or the mean
    loss per token of pseudo-labels and their utterances (:func:`held_out_pseudo_loss`)."""

    def __init__(self, evaluate: Callable[[int], tuple[float, int]] | None = None, measure: str = "errors",
                 of: str = "words") -> None:
        self.evaluate, self.measure, self.of = evaluate, measure, of
        self.scores: list[float] = []
        self.count = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.seconds = 0.0  # spent on the held-out utterances

    def after_epoch(self, model) -> None:
        if self.evaluate is None:
            return
        start = time.time()
        score, self.count = self.evaluate(len(self.scores))
        self.seconds += time.time() - start
        if self.scores and score <= min(self.scores):
            self.best_state = lora_state(model)
        self.scores.append(score)
        logging.info(f"held-out {self.measure} after epoch {len(self.scores) - 1}: {score} ({self.count} {self.of})")

    @property
    def best_epoch(self) -> int:
        """The epoch to keep: the last one with the lowest score (0: the starting point)."""
        best = min(self.scores)
        return max(i for i, e in enumerate(self.scores) if e == best)

    def report(self, utterances: int) -> dict:
        """What ``pqm_adapter.json`` or ``fallback.json`` records of the held-out slice."""
        return {"utterances": utterances, self.of: self.count, f"{self.measure}_per_epoch": self.scores}


class StepTimer:
    """Wall time of a job's steps, one after another, and the process's peak memory."""

    def __init__(self) -> None:
        self.start = self.last = time.time()
        self.seconds: dict[str, float] = {}

    def done(self, step: str) -> None:
        now = time.time()
        self.seconds[step] = round(now - self.last, 1)
        self.last = now

    def report(self) -> dict:
        """``seconds`` (total), ``seconds_by_step`` and ``peak_memory_mb`` (resident set size)."""
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
        return {"seconds": round(time.time() - self.start, 1), "seconds_by_step": dict(self.seconds),
                "peak_memory_mb": round(peak_kb / 1024)}


class Checkpoint:
    """Per-epoch training state in ``<dir>``, written atomically, for resuming a killed run."""

    def __init__(self, path: Path, key: dict) -> None:
        self.path, self.key = path, key

    def save(self, model, optim: torch.optim.Optimizer, schedule: LambdaLR, epoch: int, losses: list[float],
             selection: Selection) -> None:
        with atomic_path(self.path) as tmp:
            tmp.mkdir()
            save_file(lora_state(model), str(tmp / "lora.safetensors"))
            if selection.best_state is not None:
                save_file(selection.best_state, str(tmp / "best.safetensors"))
            torch.save({"optim": optim.state_dict(), "schedule": schedule.state_dict(), "rng": torch.get_rng_state()},
                       tmp / "optim.pt")
            write_json(tmp / "state.json", {"key": self.key, "epoch": epoch, "losses": losses,
                                            "scores": selection.scores, "count": selection.count})

    def load(self, model, optim: torch.optim.Optimizer, schedule: LambdaLR, selection: Selection
             ) -> tuple[int, list[float]]:
        """Restore the state of a matching checkpoint (and ``selection``'s); return (epochs done, losses)."""
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
        if "schedule" in extra:  # (a constant rate's checkpoints from before schedules have none)
            schedule.load_state_dict(extra["schedule"])
        torch.set_rng_state(extra["rng"])
        selection.scores = state.get("scores", state.get("errors", []))  # ("errors", "words": before 2026-12-01)
        selection.count = state.get("count", state.get("words", 0))
        if (self.path / "best.safetensors").exists():
            selection.best_state = load_file(str(self.path / "best.safetensors"))
        logging.info(f"resuming from {self.path} after epoch {state['epoch']}")
        return state["epoch"], state["losses"]

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


SCHEDULES = ("constant", "linear")


def learning_rate_schedule(optim: torch.optim.Optimizer, schedule: str, warmup_ratio: float, steps: int) -> LambdaLR:
    """The per-step learning-rate schedule (see :func:`train_adapter`); ``linear`` warms up for at least one step."""
    from transformers import get_constant_schedule, get_linear_schedule_with_warmup

    if schedule == "constant":
        return get_constant_schedule(optim)
    return get_linear_schedule_with_warmup(optim, max(1, round(warmup_ratio * steps)), steps)


def train_adapter(
    model, cuts: CutSet, batches_of, epochs: int, lr: float, batch_size: int, seed: int,
    device: str = "cpu", checkpoint: Checkpoint | None = None, ranks: Ranks = Ranks(),
    selection: Selection | None = None, schedule: str = "constant", warmup_ratio: float = 0.1,
    max_duration: float = 0.0,
) -> list[float]:
    """Train the trainable (LoRA) parameters of ``model``; return the mean loss per epoch.

    ``batches_of(cuts, batch_size, epoch, seed, rank, world_size, max_duration)`` gives the
    keyword arguments of the model's forward, whose first output is the loss
    (a family's ``batch_iterator``, see :mod:`pqm.families`); ``max_duration`` > 0: batches of at
    most that many seconds of similar-length utterances instead of ``batch_size`` utterances.

    With ``checkpoint``, the state is saved after every epoch and a matching
    saved state is resumed from. With ``ranks.world_size`` > 1 (torchrun),
    each rank trains on its share of the batches and DDP averages the gradients.
    With ``selection``, the held-out errors are measured before training and
    after every epoch (see :class:`Selection`). ``schedule``: a constant
    learning rate, or ``linear`` (transformers' linear warm-up over
    ``warmup_ratio`` of the steps, then linear decay to 0).
    """
    selection = selection or Selection()
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    per_epoch = (sum(1 for _ in cut_batches(cuts, batch_size, 0, seed, rank=ranks.rank, world_size=ranks.world_size,
                                            max_duration=max_duration)) if max_duration > 0
                 else math.ceil(math.ceil(len(cuts) / batch_size) / ranks.world_size))
    lr_schedule = learning_rate_schedule(optim, schedule, warmup_ratio, epochs * per_epoch)
    done, losses = checkpoint.load(model, optim, lr_schedule, selection) if checkpoint else (0, [])
    if done == 0:
        selection.after_epoch(model)
    net = data_parallel(model, device) if ranks.world_size > 1 else model
    for epoch in range(done, epochs):
        model.train()
        freeze_batchnorm(model)
        sums = torch.zeros(2, dtype=torch.float64)  # loss total, batches
        batches = batches_of(cuts, batch_size, epoch=epoch, seed=seed, rank=ranks.rank, world_size=ranks.world_size,
                             max_duration=max_duration)
        for batch in tqdm(batches, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", mininterval=5,
                          disable=not ranks.main):
            loss = net(**{k: v.to(device) for k, v in batch.items()})[0]
            optim.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            optim.step()
            lr_schedule.step()
            sums += torch.tensor([loss.item(), 1.0], dtype=torch.float64)
        if ranks.world_size > 1:
            sums = sums.to(device)
            dist.all_reduce(sums)
        total, count = sums.tolist()
        losses.append(total / max(count, 1))
        logging.info(f"epoch {epoch + 1}: mean loss {losses[-1]:.3f} over {count:.0f} batches")
        selection.after_epoch(model)
        if checkpoint and ranks.main:
            checkpoint.save(model, optim, lr_schedule, epoch + 1, losses, selection)
    model.eval()
    return losses


def add_training_options(p: argparse.ArgumentParser) -> None:
    """The options stages 6 and 7 share: model, data, LoRA and optimisation."""
    default = LoraSettings(target_modules="")
    p.add_argument("--fp-dir", type=Path, required=True, help="full-precision model (stage 4)")
    p.add_argument("--nf4-dir", type=Path, required=True, help="NF4 model (stage 5)")
    p.add_argument("--cuts", type=Path, required=True, help="lhotse cuts to train on")
    add_speaker_options(p, "train on")
    p.add_argument("--lora-init", default="zero", choices=INITS,
                   help="a new LoRA's start: zero (B = 0, peft's default) or svd (the rank-r SVD of the NF4 "
                        "quantisation error, pqm.lora.init_from_quantisation_error)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-schedule", default="constant", choices=SCHEDULES,
                   help="constant, or linear: warm-up over --warmup-ratio of the steps, then linear decay to 0")
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-duration", type=float, default=0.0,
                   help="batches of similar-length utterances adding up to at most this many seconds, instead of "
                        "--batch-size utterances (lhotse's DynamicBucketingSampler; 0: off)")
    p.add_argument("--max-utts", type=int, default=0, help="use at most this many utterances (0: all)")
    add_speed_perturb_option(p)
    p.add_argument("--lora-r", type=int, default=default.r)
    p.add_argument("--lora-alpha", type=int, default=default.alpha)
    p.add_argument("--lora-dropout", type=float, default=default.dropout)
    p.add_argument("--lora-targets", default=None, help="regex over module names (default: the model family's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--window", default="padded", choices=("padded", "trimmed"),
                   help="Whisper input: the 30 s window, or only the batch's longest clip (pqm.families.whisper.features)")
    p.add_argument("--target-style", default="corpus", choices=STYLES,
                   help="Whisper targets: the references as they are, or restyled (pqm.restyle)")
    p.add_argument("--pseudo-keep", type=float, default=0.3,
                   help="--targets pseudo: the fraction of hypotheses kept, the most confident (lowest loss)")
    p.add_argument("--pseudo-rounds", type=int, default=1,
                   help="--targets pseudo: rounds of self-training; each after the first trains again from the start "
                        "on the hypotheses of the round before's adapter (1: the labeller's only)")
    p.add_argument("--pseudo-token-floor", type=float, default=0.0,
                   help="--targets pseudo: leave out of the attention loss the tokens of a kept hypothesis whose "
                        "probability under the labeller is below this (STAR-style masking; 0: off)")
    p.add_argument("--pseudo-prior-iters", type=int, default=0,
                   help="--targets pseudo: label under a per-speaker token bias, estimated in this many decodings, "
                        "that brings the hypotheses' token frequencies to --pseudo-prior-cuts', and give the adapter "
                        "its own such bias for decoding (0: off; ESPnet only)")
    p.add_argument("--pseudo-prior-cuts", type=Path, default=None,
                   help="--pseudo-prior-iters: cuts whose transcripts give the token prior (the training set's)")
    p.add_argument("--holdout", type=int, default=0,
                   help="do no harm: hold out the speaker's last N utterances and keep the best epoch only "
                        "if it is no worse there than the starting adapter (0: off)")
    p.add_argument("--ctc-weight", type=float, default=0.5, help="Conformer: CTC weight of held-out decoding")


def add_speed_perturb_option(p: argparse.ArgumentParser) -> None:
    """``--speed-perturb F ...``: train on the cuts once per speed factor (:func:`pqm.batches.speed_perturbed`)."""
    p.add_argument("--speed-perturb", type=float, nargs="*", default=[], metavar="F",
                   help="train on every utterance once per speed factor, e.g. 0.9 1.0 1.1 (1.0: as it is; "
                        "none: off): new voices for a model that has heard few speakers")


def check_speed_perturb(p: argparse.ArgumentParser, factors: list[float]) -> None:
    """Refuse speed factors outside [0.5, 2] or given twice (``p.error``)."""
    if any(not 0.5 <= f <= 2.0 for f in factors) or len(set(factors)) != len(factors):
        p.error(f"--speed-perturb {' '.join(map(str, factors))}: distinct factors in [0.5, 2] are needed, "
                "e.g. 0.9 1.0 1.1")


def check_training_options(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Refuse values :func:`add_training_options`' types let through (``p.error``: exit 2 with usage)."""
    for name in ("epochs", "batch_size", "lora_r", "lora_alpha", "pseudo_rounds"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(a, name)}: a positive number is needed")
    check_speed_perturb(p, a.speed_perturb)
    if a.max_duration < 0:
        p.error(f"--max-duration {a.max_duration}: a number of seconds >= 0 is needed (0: --batch-size utterances)")
    if a.holdout < 0 or a.lr <= 0:
        p.error("--holdout must be >= 0 and --lr > 0")
    if not 0 < a.pseudo_keep <= 1:
        p.error(f"--pseudo-keep {a.pseudo_keep}: a fraction in (0, 1] is needed")
    if not 0 <= a.pseudo_token_floor < 1:
        p.error(f"--pseudo-token-floor {a.pseudo_token_floor}: a probability in [0, 1) is needed (0: off)")
    if a.pseudo_prior_iters < 0:
        p.error(f"--pseudo-prior-iters {a.pseudo_prior_iters}: a number >= 0 is needed (0: off)")
    if a.pseudo_prior_iters and a.pseudo_prior_cuts is None:
        p.error("--pseudo-prior-iters needs --pseudo-prior-cuts (the training cuts, whose transcripts give the prior)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    add_training_options(p)
    p.add_argument("--out", type=Path, required=True, help="adapter folder to write")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--init", type=Path, default=None, help="adapter to start from (the SAT adapter); default: new LoRA")
    start.add_argument("--init-saml", type=Path, default=None,
                       help="saml's folder (stage 6): start from its experts merged at the mean of the router's weights "
                            "over the speaker's training audio (saml_sa)")
    p.add_argument("--targets", default="transcripts", choices=("transcripts", "pseudo"),
                   help="pseudo: the starting adapter's own hypotheses of the audio, transcripts unread (pqm_unsup)")
    p.add_argument("--pseudo-saml", type=Path, default=None,
                   help="--targets pseudo: saml's folder (stage 6): its hypotheses are the targets, not the start's")
    a = p.parse_args(argv)
    check_training_options(p, a)
    if a.targets == "pseudo" and a.init is None:
        p.error("--targets pseudo needs --init (the adapter the speaker's LoRA starts from)")
    if a.pseudo_saml is not None and a.targets != "pseudo":
        p.error("--pseudo-saml labels the audio for --targets pseudo only")
    setup_logging()
    a.lora_targets = a.lora_targets or family(a.fp_dir).DEFAULT_TARGETS
    ranks, a.device = init_distributed(a.device)
    try:
        for speaker in job_speakers(a):
            train_job(a, ranks, speaker)
    finally:
        if ranks.world_size > 1:
            dist.destroy_process_group()


def fp_hypotheses(rec, cuts: CutSet, cache: Path, key: dict, also: Path | None = None) -> dict[str, str]:
    """The full-precision model's greedy hypotheses of ``cuts`` (cached in ``cache`` under ``key``); read from
    ``also`` (another adapter's cache, e.g. SAT's for saml's experts) where it holds them all, of the same model."""
    for source in (cache, also):
        cached = read_json(source) if source is not None and source.exists() else {}
        if cached.get("key", {}).get("fp") == key["fp"] and all(c.id in cached["hyps"] for c in cuts):
            return {c.id: cached["hyps"][c.id] for c in cuts}
    hyps = rec.transcribe(cuts, desc="fp hypotheses for the targets")
    write_json(cache, {"key": key, "hyps": hyps})
    return hyps


def fp_hypotheses_cache(out: Path, speaker: str | None) -> Path:
    """Where :func:`fp_hypotheses` are kept: a speaker's beside every system's adapters of that speaker
    (``adapters/.fp_hyps/<speaker>.json``: ``pqm`` and ``nf4_sa`` decode them once), SAT's beside SAT."""
    if speaker is None:
        return out.parent / f".{out.name}.fp_hyps.json"
    return out.parent / ".fp_hyps" / f"{speaker}.json"


def styled_targets(rec, cuts: CutSet, style: str, fp_dir: Path, cache: Path, also: Path | None = None) -> CutSet:
    """The cuts with their transcripts in ``style`` (``--target-style``), with the full-precision model's
    hypotheses (:func:`fp_hypotheses`, cached in ``cache``) where the style needs them: ``rec``'s model must
    then still be the full-precision one."""
    if style == "corpus":
        return cuts
    hyps = None
    if style == "model":
        rec.set_window(BASE_WINDOW)  # the full-precision model reads its 30 s window
        hyps = fp_hypotheses(rec, cuts, cache, {"fp": file_digest(fp_dir / "model.safetensors"),
                                                "utterances": ids_digest(c.id for c in cuts)}, also=also)
    return restyled(cuts, style, hyps)


def restyled(cuts: CutSet, style: str, hyps: dict[str, str] | None) -> CutSet:
    """The cuts with their transcripts written in ``style`` (:func:`pqm.restyle.restyle`)."""
    def one(cut):
        return with_text(cut, restyle(cut.supervisions[0].text or "", (hyps or {}).get(cut.id), style))

    out = cuts.map(one).to_eager()
    for cut in list(out)[:3]:
        logging.info(f"target of {cut.id}: {cut.supervisions[0].text!r}")
    return out


def held_out_errors(rec, cuts: CutSet, normalise: Callable[[str], str], windows: tuple[str, str]
                    ) -> Callable[[int], tuple[int, int]]:
    """A function that decodes ``cuts`` with ``rec`` after an epoch and returns (word errors, reference words).

    ``windows``: the Whisper input of epoch 0, the starting point, as stage 8 decodes it when it is the
    fallback (the bare NF4 model: its 30 s window), and of the later epochs (the adapter's training input)."""
    refs = {c.id: normalise(c.supervisions[0].text or "") for c in cuts}
    # A hypothesis far longer than the reference is wrong whatever its end: stop it early, so that an
    # adapter that loops (Whisper's fallback decodes up to six times) costs seconds, not minutes.
    limit = 4 * max(len(r.split()) for r in refs.values()) + 16

    def evaluate(epoch: int) -> tuple[int, int]:
        rec.set_window(windows[0] if epoch == 0 else windows[1])
        rec.model.eval()  # no dropout; the next epoch sets train mode again
        hyps = rec.transcribe(cuts, desc="held-out", max_new_tokens=limit)
        counts = count_errors([refs[u] for u in sorted(refs)], [normalise(hyps[u]) for u in sorted(refs)])
        return counts["errors"], counts["words"]

    return evaluate


def held_out_pseudo_loss(rec, cuts: CutSet, batches_of: Callable, per_token: Callable, device: str, window: str
                         ) -> Callable[[int], tuple[float, int]]:
    """``pqm_unsup``'s held-out judge, no transcript read: a function that scores the model after an epoch by its
    mean training loss per token (the family's ``token_loss``) of ``cuts``, whose texts are the starting
    adapter's hypotheses of the held-out audio (:func:`pqm.pseudo_labels.pseudo_labelled`), in ``window``."""
    def evaluate(epoch: int) -> tuple[float, int]:
        rec.set_window(window)
        rec.model.eval()  # no dropout; the next epoch sets train mode again
        losses = [target_loss(rec.model, cut, batches_of, per_token, device) for cut in cuts]
        return round(sum(losses) / len(losses), 4), len(losses)

    return evaluate


def training_prior(a: argparse.Namespace, rec) -> Counter:
    """The token counts of ``--pseudo-prior-cuts``' transcripts in ``rec``'s tokens (``pqm_unsup``'s prior)."""
    if not hasattr(rec, "set_token_bias"):
        raise BadInput(f"--pseudo-prior-iters {a.pseudo_prior_iters}: the {family_of(a.fp_dir)} family's decoding "
                       "takes no token bias (ESPnet models only); use 0")
    prior = token_counts((c.supervisions[0].text or "" for c in CutSet.from_file(
        require(a.pseudo_prior_cuts, "stage 2 (manifests)"))), rec.tokens)
    if not prior:
        raise BadInput(f"{a.pseudo_prior_cuts}: no transcript to take a token prior from; rerun stage 2 (manifests)")
    return prior


def saml_labeller(a: argparse.Namespace, models, cuts: CutSet) -> tuple[object, dict[str, dict[str, float]], Callable]:
    """``saml`` as ``pqm_unsup``'s labeller (``--pseudo-saml``): a second NF4 model with saml's experts loaded,
    each cut's routing weights over them (as stage 8 decodes ``saml``), and batches in the experts' window."""
    rec = models.recognizer(a.fp_dir, a.device, beam_size=1, ctc_weight=a.ctc_weight)
    mixture = Mixture(rec.model, a.pseudo_saml, to_nf4(rec.model, a.nf4_dir, device=a.device))
    rec.set_window(mixture.window)
    routes = dict(zip((cut.id for cut in cuts), mixture.route(rec, models, list(cuts))))
    return rec, routes, models.batch_iterator(a.fp_dir, mixture.window)


def train_job(a: argparse.Namespace, ranks: Ranks, speaker: str | None) -> None:
    """Train (or skip, or mark as fallback) the adapter that ``a`` describes, on ``speaker``'s cuts (None: all)."""
    torch.manual_seed(a.seed)
    out = a.out / speaker if a.speaker_list is not None else a.out
    cuts = CutSet.from_file(require(a.cuts, "stage 2 (manifests)"))
    if speaker is not None:
        cuts = cuts.filter(lambda c: c.supervisions[0].speaker == speaker).to_eager()
    if a.max_utts and len(cuts) > a.max_utts:
        cuts = cuts.subset(first=a.max_utts)
    if len(cuts) == 0 and speaker is None:
        raise BadInput(f"{a.cuts} holds no utterances to train on: rerun stage 2 (manifests)")
    if len(cuts) == 0:
        logging.warning(f"speaker {speaker}: no adaptation data in {a.cuts}; falling back (see {out}/fallback.json)")
        if ranks.main:
            write_json(out / "fallback.json", {"speaker": speaker, "reason": f"no adaptation utterances in {a.cuts}"})
        return
    models = family(a.fp_dir)
    if family_of(a.fp_dir) != "whisper" and a.target_style != "corpus":
        raise BadInput(f"--target-style {a.target_style}: only Whisper models write in a style of their own; "
                       "use --target-style corpus for the Conformer")
    if a.holdout and len(cuts) <= a.holdout:
        raise BadInput(f"speaker {speaker}: {len(cuts)} adaptation utterances, so none is left to train on after "
                       f"holding out {a.holdout}: lower --holdout")
    key = run_key(a, speaker, cuts, ranks.world_size)
    for done in (out / META, out / "fallback.json"):
        if done.exists() and read_json(done).get("run_key") == key:
            logging.info(f"{out} was already made with these inputs and settings: nothing to do")
            return
    timer = StepTimer()
    rec = models.recognizer(a.fp_dir, a.device, beam_size=1, ctc_weight=a.ctc_weight)
    model = rec.model
    base_params = count_params(model)
    timer.done("load the model")
    if a.target_style != "corpus" and a.targets == "transcripts":
        cuts = styled_targets(rec, cuts, a.target_style, a.fp_dir, fp_hypotheses_cache(a.out, speaker),
                              also=fp_hypotheses_cache(a.init, None) if a.init else None)
        timer.done("restyle the targets")
    rec.set_window(a.window)
    held_ids = set(sorted(c.id for c in cuts)[len(cuts) - a.holdout:]) if a.holdout else set()
    held_out = cuts.filter(lambda c: c.id in held_ids).to_eager() if held_ids else None
    train_cuts = cuts.filter(lambda c: c.id not in held_ids).to_eager()
    fp_weights = linear_weights(model) if a.init is None and a.lora_init == "svd" else None
    base_fingerprint = to_nf4(model, a.nf4_dir, device=a.device)
    mixing = None
    if a.init is not None:
        model = load_adapter(model, a.init, base_fingerprint, trainable=True)
    elif a.init_saml is not None:  # routing reads the training audio only, as the mixture decodes it
        mixture = Mixture(model, a.init_saml, base_fingerprint)
        rec.set_window(mixture.window)
        mixing = mixture.merged(rec, models, list(train_cuts))
        rec.set_window(a.window)
        model = mixture.model
        logging.info("started from saml's experts merged at " + ", ".join(f"{n} {w:.3f}" for n, w in mixing.items()))
    else:
        model = add_lora(model, LoraSettings(a.lora_targets, a.lora_r, a.lora_alpha, a.lora_dropout))
    if fp_weights is not None:
        share = init_from_quantisation_error(model, fp_weights)
        logging.info(f"LoRA started from the SVD of the quantisation error: {100 * share:.1f}% of its energy removed")
        del fp_weights
    timer.done("quantise, add LoRA")
    batches_of = models.batch_iterator(a.fp_dir, a.window)
    unlabelled = train_cuts
    masking = {"token_floor": a.pseudo_token_floor, "token_probs": models.token_probs}
    prior = training_prior(a, rec) if a.targets == "pseudo" and a.pseudo_prior_iters else None
    bias = None
    if a.targets == "pseudo":
        labeller, routes, label_batches = saml_labeller(a, models, cuts) if a.pseudo_saml else (rec, None, batches_of)
        bias = prior_bias(labeller, train_cuts, prior, a.pseudo_prior_iters, routes) if prior else None
        train_cuts, pseudo = pseudo_labelled(labeller, train_cuts, label_batches, models.token_loss, a.pseudo_keep,
                                             a.device, routes, token_bias=bias, **masking)
        if held_out:  # every usable hypothesis of the held-out audio is a reference there
            held_out, held_pseudo = pseudo_labelled(labeller, held_out, label_batches, models.token_loss, 1.0,
                                                    a.device, routes, token_bias=bias)
            pseudo.update({cut_id: {**r, "kept": False, "held_out": True} for cut_id, r in held_pseudo.items()})
        del labeller
        timer.done("pseudo-labels")
        if len(train_cuts) == 0 and ranks.main:
            reason = f"no hypothesis of the {len(cuts)} adaptation utterances can be a target (empty or unencodable)"
            logging.warning(f"speaker {speaker}: {reason}; keeping the starting point (see {out}/fallback.json)")
            write_json(out / "fallback.json", {"speaker": speaker, "reason": reason, "run_key": key,
                                                "pseudo_labels": pseudo})
        if len(train_cuts) == 0:
            return
    n_lora = trainable_params(model)
    logging.info(f"training {n_lora} LoRA parameters ({100 * n_lora / base_params:.2f}% of {base_params}) on "
                 f"{len(train_cuts)} utterances" + (f", {a.holdout} held out" if a.holdout else ""))
    selection = Selection(None)
    if held_out and a.targets == "pseudo":
        selection = Selection(held_out_pseudo_loss(rec, held_out, batches_of, models.token_loss, a.device, a.window),
                              measure="pseudo_label_loss", of="hypotheses")
    elif held_out:
        normaliser = models.text_normaliser(a.fp_dir, split_digits(a.cuts.parent))
        start = mixture_window(a.init_saml) if a.init_saml else adapter_window(a.init)
        selection = Selection(held_out_errors(rec, held_out, normaliser, (start, a.window)))
    rounds = a.pseudo_rounds if a.targets == "pseudo" else 1
    start_state = lora_state(model) if rounds > 1 else None
    checkpoints = [Checkpoint(out.parent / (f".{out.name}.checkpoint" + (f".round{r}" if r > 1 else "")),
                              {**key, "round": r} if r > 1 else key) for r in range(1, rounds + 1)]
    earlier_rounds, relabel_seconds, losses = [], 0.0, []
    for r, checkpoint in enumerate(checkpoints, 1):
        if r > 1:  # self-training: this round's adapter labels the audio anew, and training starts again from the start
            begin = time.time()
            round_bias = prior_bias(rec, unlabelled, prior, a.pseudo_prior_iters) if prior else None
            relabelled, report = pseudo_labelled(rec, unlabelled, batches_of, models.token_loss, a.pseudo_keep, a.device,
                                                 token_bias=round_bias, **masking)
            relabel_seconds += time.time() - begin
            if len(relabelled) == 0:
                logging.warning(f"speaker {speaker}: round {r}: no usable hypothesis; keeping round {r - 1}'s adapter")
                break
            earlier_rounds.append({"utterances": len(train_cuts), "loss_per_epoch": losses, "pseudo_labels": pseudo,
                                   **({"token_bias": bias} if bias else {})})
            bias = round_bias
            held = {cut_id: row for cut_id, row in pseudo.items() if row.get("held_out")}
            train_cuts, pseudo = relabelled, {**report, **held}
            set_peft_model_state_dict(model, start_state)
        # the held-out judge (if any) judges the last round: the adapter that is kept or not
        losses = train_adapter(model, speed_perturbed(train_cuts, a.speed_perturb), batches_of, a.epochs, a.lr, a.batch_size,
                               a.seed, a.device, checkpoint, ranks, selection if r == rounds else Selection(None),
                               a.lr_schedule, a.warmup_ratio, a.max_duration)
    timer.done("train")
    if relabel_seconds:
        timer.seconds["train"] = round(timer.seconds["train"] - relabel_seconds, 1)
        timer.seconds["pseudo-labels of the later rounds"] = round(relabel_seconds, 1)
    if selection.scores:  # the held-out judging happened between the epochs: reported apart
        timer.seconds["train"] = round(timer.seconds["train"] - selection.seconds, 1)
        judging = "decode the held-out utterances" if selection.measure == "errors" else "score the held-out pseudo-labels"
        timer.seconds[judging] = round(selection.seconds, 1)
    if not ranks.main:
        return
    meta = {
        "base_fingerprint": base_fingerprint, "base_model": str(a.nf4_dir), "speaker": speaker,
        "init": str(a.init) if a.init else f"saml {a.init_saml}" if a.init_saml else a.lora_init,
        "utterances": len(train_cuts), "epochs": a.epochs, "lr": a.lr, "lr_schedule": a.lr_schedule,
        "loss_per_epoch": losses, "lora_params": n_lora, "base_params": base_params, "window": a.window,
        "target_style": a.target_style, "world_size": ranks.world_size, "run_key": key,
        **({"speed_perturb": a.speed_perturb} if a.speed_perturb else {}),
    }
    if a.targets == "pseudo":
        meta.update(targets="pseudo", pseudo_labeller=f"saml {a.pseudo_saml}" if a.pseudo_saml else "start",
                    pseudo_labels=pseudo, **({"pseudo_token_bias": bias} if bias else {}))
        if rounds > 1:  # the rounds before the last, each labelled by the one before it (the first by the labeller)
            meta.update(pseudo_rounds=len(earlier_rounds) + 1, earlier_rounds=earlier_rounds)
    if mixing:
        meta.update(mixture_weights={n: round(w, 4) for n, w in mixing.items()})
    if selection.scores:
        best = selection.best_epoch
        meta.update(held_out=selection.report(a.holdout), kept_epoch=best)
        if best == 0:  # adaptation did not help on held-out speech: keep the starting point
            reason = (f"held-out {selection.measure} {selection.scores} (epoch 0 = the starting adapter): no epoch "
                      f"did better than the start")
            logging.warning(f"speaker {speaker}: {reason}; keeping the starting point (see {out}/fallback.json)")
            shutil.rmtree(out, ignore_errors=True)
            write_json(out / "fallback.json", {"speaker": speaker, "reason": reason, **meta, **timer.report()})
            for checkpoint in checkpoints:
                checkpoint.remove()
            return
        if best < a.epochs:
            set_peft_model_state_dict(model, selection.best_state)
            logging.info(f"keeping the adapter of epoch {best} (the lowest held-out {selection.measure})")
    if prior:  # the kept adapter's own bias, from its hypotheses of the same audio: stage 8 decodes under it
        meta["decode_token_bias"] = prior_bias(rec, unlabelled, prior, a.pseudo_prior_iters)
        timer.done("token prior for decoding")
    meta.update(timer.report())
    (out / "fallback.json").unlink(missing_ok=True)
    save_adapter(model, out, meta)
    for checkpoint in checkpoints:
        checkpoint.remove()
    timer.done("save")
    steps = ", ".join(f"{step} {seconds} s" for step, seconds in timer.seconds.items())
    logging.info(f"wrote adapter {out}; {steps}; peak memory {meta['peak_memory_mb']} MB")


if __name__ == "__main__":
    cli(main)

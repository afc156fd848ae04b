"""Stages 3-4 of the Conformer: ESPnet's data, feature statistics and training, with ESPnet's own ASR task and trainer.

:func:`espnet_options` writes ESPnet's data options (as ESPnet's asr.sh
does); :func:`collect_stats` (stage 3) and :func:`train` (stage 4) run
``espnet2.bin.asr_train`` through :class:`PqmASRTask`, which is ESPnet's task
with two changes that make a killed run resume safely (``--resume true``):

- every file ESPnet's trainer writes with ``torch.save`` (``checkpoint.pth``
  after each epoch, the epoch and averaged models) is written to a temporary
  file and renamed, so a kill never leaves a torn checkpoint;
- the checkpoint is read back with ``torch.load(weights_only=True)``, allowing
  only the numpy scalar and timedelta types ESPnet's reporter stores, instead
  of ESPnet's ``weights_only=False``.

A checkpoint is resumed only by the training that wrote it: ``<expdir>/asr/pqm_training.json`` records the
options and the contents of the files they name (config, statistics, data, token list), all but
``--max_epoch`` (a rerun with more epochs continues), and stage 4 started with any other clears ``asr/``.

Multi-GPU training is ESPnet's own: ``--ngpu N --multiprocessing_distributed
true`` spawns one process per GPU, each of which goes through
:meth:`PqmASRTask.main_worker`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from espnet2.tasks.asr import ASRTask
from espnet2.train.trainer import Trainer

from pqm.errors import require
from pqm.files import atomic_path, file_digest, read_json, write_json
from pqm.tokens import token_dir_name

_CHECKPOINT_TYPES = [np._core.multiarray.scalar, np.dtype, datetime.timedelta,
                     *{type(np.dtype(t)) for t in ("float16", "float32", "float64", "int32", "int64", "bool")}]


@contextlib.contextmanager
def atomic_torch_save() -> Iterator[None]:
    """Within this block, ``torch.save`` to a path writes a temporary file and renames it."""
    original = torch.save

    def save(obj, f, *args, **kwargs):
        if not isinstance(f, (str, os.PathLike)):
            return original(obj, f, *args, **kwargs)
        with atomic_path(f) as tmp:
            original(obj, tmp, *args, **kwargs)

    torch.save = save
    try:
        yield
    finally:
        torch.save = original


class SafeResumeTrainer(Trainer):
    """ESPnet's trainer, resuming from a checkpoint loaded with ``weights_only=True``."""

    @staticmethod
    def resume(checkpoint, model, reporter, optimizers, schedulers, scaler, ngpu: int = 0, strict: bool = True):
        original = torch.load

        def load(f, map_location=None, weights_only=True, **kwargs):
            with torch.serialization.safe_globals(_CHECKPOINT_TYPES):
                return original(f, map_location=map_location, weights_only=True, **kwargs)

        torch.load = load
        try:
            Trainer.resume(checkpoint, model, reporter, optimizers, schedulers, scaler, ngpu=ngpu, strict=strict)
        finally:
            torch.load = original


class PqmASRTask(ASRTask):
    """ESPnet's ASR task with :class:`SafeResumeTrainer` and atomic checkpoint files."""

    trainer = SafeResumeTrainer

    @classmethod
    def main_worker(cls, args) -> None:
        with atomic_torch_save():
            super().main_worker(args)


def espnet_options(a: argparse.Namespace) -> list[str]:
    """ESPnet's data and device options for the Kaldi data dirs and token list of stage 3."""
    token_dir = a.datadir / "token_list" / token_dir_name(a.token_type, a.nbpe)
    opts = ["--use_preprocessor", "true", "--token_type", a.token_type, "--token_list", f"{token_dir}/tokens.txt",
            "--config", str(a.train_config), "--frontend_conf", "fs=16k"]
    for role, name in (("train", "train"), ("valid", "valid")):
        opts += [f"--{role}_data_path_and_name_and_type", f"{a.datadir}/{name}/wav.scp,speech,sound",
                 f"--{role}_data_path_and_name_and_type", f"{a.datadir}/{name}/text,text,text"]
    if a.token_type == "bpe":
        opts += ["--bpemodel", f"{token_dir}/bpe.model"]
    ngpu = a.ngpu if a.device == "cuda" else 0
    opts += ["--ngpu", str(ngpu)] + (["--multiprocessing_distributed", "true"] if ngpu > 1 else [])
    return opts


def collect_stats(a: argparse.Namespace) -> None:
    """Stage 3 (end): ESPnet's feature statistics of the training data, in ``<expdir>/asr_stats``."""
    out = a.expdir / "asr_stats"
    shutil.rmtree(out, ignore_errors=True)
    PqmASRTask.main(cmd=espnet_options(a) + [
        "--collect_stats", "true", "--train_shape_file", f"{a.datadir}/train/wav.scp",
        "--valid_shape_file", f"{a.datadir}/valid/wav.scp", "--ngpu", "0", "--multiprocessing_distributed", "false",
        "--output_dir", str(out)])


TRAINING = "pqm_training.json"  # in <expdir>/asr: what the checkpoint there was trained with


def training_key(opts: list[str]) -> list[str]:
    """ESPnet's options as a resume key: each value that names a file (``path`` or ``path,name,type`` or
    ``name=path``) as that file's content digest, so that a copied experiment keeps its key; no ``--max_epoch``."""
    def value(v: str) -> str:
        path = Path(v.split(",")[0].split("=")[-1])
        return f"{v.replace(str(path), '<file>')} {file_digest(path)}" if path.is_file() else v
    return [value(v) for k, v in zip(opts[::2], opts[1::2]) if k != "--max_epoch" for v in (k, v)]


def fresh_unless_same_training(out: Path, key: list[str]) -> None:
    """Clear ``out`` (ESPnet's output folder) unless its checkpoint was trained with ``key``; record ``key``."""
    done = out / TRAINING
    if out.exists() and not (done.exists() and read_json(done)["key"] == key):
        logging.warning(f"{out} holds a training run with other options or data (or none recorded): "
                        "removed, training from the start")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(done, {"key": key})


def train(a: argparse.Namespace) -> tuple[Path, Path]:
    """Stage 4: train in ``<expdir>/asr`` (resuming from its ``checkpoint.pth`` if the same training wrote it);
    return (config, averaged model)."""
    stats = require(a.expdir / "asr_stats" / "train" / "feats_stats.npz", "stage 3 (feature statistics)")
    shapes = a.expdir / "asr_stats"
    out = a.expdir / "asr"
    opts = espnet_options(a) + [
        "--train_shape_file", f"{shapes}/train/speech_shape", "--valid_shape_file", f"{shapes}/valid/speech_shape",
        "--normalize", "global_mvn", "--normalize_conf", f"stats_file={stats}", "--max_epoch", str(a.max_epoch),
        "--seed", str(a.seed), "--resume", "true"]
    fresh_unless_same_training(out, training_key(opts))
    PqmASRTask.main(cmd=opts + ["--output_dir", str(out)])
    return out / "config.yaml", out / "valid.acc.ave.pth"


def main(argv: list[str] | None = None) -> None:
    """``python -m pqm.train_conformer <espnet2.bin.asr_train options>``: ESPnet's trainer with safe resuming."""
    PqmASRTask.main(cmd=argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()

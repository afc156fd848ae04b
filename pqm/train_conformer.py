"""Stage 4: train the Conformer AED with ESPnet's own ASR task and trainer.

``python -m pqm.train_conformer <espnet2.bin.asr_train options>`` is
``espnet2.bin.asr_train`` with two changes that make a killed run resume
safely (``--resume true``):

- every file ESPnet's trainer writes with ``torch.save`` (``checkpoint.pth``
  after each epoch, the epoch and averaged models) is written to a temporary
  file and renamed, so a kill never leaves a torn checkpoint;
- the checkpoint is read back with ``torch.load(weights_only=True)``, allowing
  only the numpy scalar and timedelta types ESPnet's reporter stores, instead
  of ESPnet's ``weights_only=False``.

Multi-GPU training is ESPnet's own: ``--ngpu N --multiprocessing_distributed
true`` spawns one process per GPU, each of which goes through
:meth:`PqmASRTask.main_worker`.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from typing import Iterator

import numpy as np
import torch
from espnet2.tasks.asr import ASRTask
from espnet2.train.trainer import Trainer

from pqm.files import atomic_path

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


def main(argv: list[str] | None = None) -> None:
    PqmASRTask.main(cmd=argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()

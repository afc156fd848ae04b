"""Stages 3-4 of every family: ``python -m pqm.families {check,prepare,train} --model NAME ...``.

``check`` looks at the options before anything is written (``--pretrained``) and prints the family's
defaults that run.sh takes (``unquantised_dtype X``, ``sat_speed_perturb F ...``);
``prepare`` is stage 3 (the family's data: ESPnet's data dirs, tokens and
feature statistics, or nothing), ``train`` stage 4 (train, or take
``--pretrained``, and export ``<expdir>/fp``). Each calls the family module's
function of that name with every option below.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pqm.errors import cli, setup_logging
from pqm.families import FAMILIES, family


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=("check", "prepare", "train"))
    p.add_argument("--model", required=True, choices=list(FAMILIES))
    p.add_argument("--expdir", type=Path, required=True)
    p.add_argument("--datadir", type=Path, required=True)
    p.add_argument("--corpus", required=True, help="the manifests' prefix (stage 2)")
    p.add_argument("--pretrained", default="", help="a model to load instead of training")
    p.add_argument("--token-type", default="word", choices=("word", "bpe"))
    p.add_argument("--nbpe", type=int, default=500)
    p.add_argument("--train-config", type=Path, default=Path("conf/train_conformer.yaml"))
    p.add_argument("--max-epoch", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--ngpu", type=int, default=1)
    a = p.parse_args(argv)
    setup_logging()
    models = family(a.model)
    getattr(models, a.step)(a)
    if a.step == "check":
        print(f"unquantised_dtype {models.UNQUANTISED_DTYPE}")
        print(f"sat_speed_perturb {models.SAT_SPEED_PERTURB}")


if __name__ == "__main__":
    cli(main)

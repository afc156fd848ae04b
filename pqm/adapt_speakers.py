"""Stage 7: the adapters of every per-speaker system for a job's test speakers, one speaker after another.

For each system of ``--systems`` (``pqm.systems.ADAPTED``: ``pqm`` from the
SAT adapter, ``nf4_sa`` as a new LoRA on the bare NF4 model, ``pqm_unsup``
from SAT on ``nf4_sat``'s own hypotheses (or ``saml``'s: ``--unsup-labeller``), ``saml_sa`` from saml's experts merged
at the speaker's mean routing weights) this trains the adapter
``<adapters>/<system>/<speaker>`` with :func:`pqm.adapt.train_job`, exactly as
a job of its own would (the model is read again and the seed reset for each
system), so the job pays Python's start-up and imports once, not once per
speaker and system.

A system that fails stops neither the others nor the job's other speakers: the
job logs its error, trains the rest, then exits with code 1 naming them.
Finished adapters are skipped by their run key, so a rerun of the stage trains
only what is missing.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pqm.adapt import add_training_options, check_training_options, init_distributed, train_job
from pqm.errors import UserError, cli, setup_logging
from pqm.families import family
from pqm.jobs import job_speakers
from pqm.systems import ADAPTED


def system_options(a: argparse.Namespace, system: str) -> argparse.Namespace:
    """The options of :func:`pqm.adapt.train_job` for ``system``'s adapter of this job's speaker."""
    how = ADAPTED[system]
    return argparse.Namespace(**{
        **vars(a), "out": a.adapters / system, "init": a.sat_dir if how.start == "sat" else None,
        "init_saml": a.saml_dir if how.start == "saml" else None, "targets": how.targets,
        "holdout": a.unsup_holdout if how.targets == "pseudo" else a.holdout,
        "pseudo_saml": a.saml_dir if how.targets == "pseudo" and a.unsup_labeller == "saml" else None,
    })


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    add_training_options(p)
    p.add_argument("--sat-dir", type=Path, required=True, help="the SAT adapter (stage 6)")
    p.add_argument("--saml-dir", type=Path, help="saml's experts and router (stage 6 with --saml-experts): saml_sa's start")
    p.add_argument("--adapters", type=Path, required=True, help="writes <adapters>/<system>/<speaker>")
    p.add_argument("--unsup-holdout", type=int, default=0,
                   help="pqm_unsup's --holdout (its own: judged on the labeller's hypotheses of them, not on transcripts)")
    p.add_argument("--unsup-labeller", default="nf4_sat", choices=("nf4_sat", "saml"),
                   help="pqm_unsup's pseudo-labels: decoded by nf4_sat (its start) or by saml (needs --saml-dir)")
    p.add_argument("--systems", nargs="+", default=["pqm", "nf4_sa"], choices=list(ADAPTED))
    a = p.parse_args(argv)
    check_training_options(p, a)
    if a.unsup_holdout < 0:
        p.error(f"--unsup-holdout {a.unsup_holdout}: a number >= 0 is needed")
    if "saml_sa" in a.systems and a.saml_dir is None:
        p.error("--systems saml_sa needs --saml-dir")
    if a.unsup_labeller == "saml" and a.saml_dir is None:
        p.error("--unsup-labeller saml needs --saml-dir")
    if a.speaker_list is None or a.job is None:
        p.error("--speaker-list FILE --job N is needed: the speakers on line N (stage 7's job array)")
    setup_logging()
    a.lora_targets = a.lora_targets or family(a.fp_dir).DEFAULT_TARGETS
    ranks, a.device = init_distributed(a.device)
    failed = []
    for speaker in job_speakers(a):
        for system in [s for s in ADAPTED if s in a.systems]:
            logging.info(f"{system}/{speaker}: adapting")
            try:
                train_job(system_options(a, system), ranks, speaker)
            except UserError as exc:
                logging.error(f"{system}/{speaker}: {exc}")
                failed.append(f"{system}/{speaker}")
            except Exception:  # noqa: BLE001 -- any failure of one system: the others still run
                logging.exception(f"{system}/{speaker}: failed")
                failed.append(f"{system}/{speaker}")
    if failed:
        logging.error(f"no adapter for {', '.join(failed)} (see above); the others are done")
        sys.exit(1)


if __name__ == "__main__":
    cli(main)

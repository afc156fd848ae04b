"""run.sh's done markers: each records the options its stage was run with, so that a rerun skips what is done.

The marker ``<expdir>/.done/stageN`` holds the options of stages 1..N (one ``--name value`` line each) as
they were when stage N finished. A stage whose marker records other options than this run's is redone, and
the later stages with it; a stage before ``--stage`` that was done with other options stops the run. An
empty marker (written by an older pqm) records nothing and counts as done.

    python -m pqm.stages --options OPTS validate                 # every option's value allowed? (:data:`RULES`)
    python -m pqm.stages --expdir E --options OPTS check FIRST   # stages before FIRST: done with OPTS?
    python -m pqm.stages --expdir E --options OPTS begin N TITLE # exit 0: run it (markers N..9 cleared); 3: done
    python -m pqm.stages --expdir E --options OPTS done N SECONDS

OPTS has one ``--name value`` line per run.sh option; which of them each stage's outputs depend on is
:data:`STAGE_INPUTS`.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from pqm.errors import BadInput, cli
from pqm.files import write_text

LAST_STAGE = 9
ALREADY_DONE = 3  # exit code of ``begin`` for a stage that is done with this run's options
log = logging.getLogger("run.sh")


# The run.sh options each stage's outputs depend on; a stage done with other values is redone, with the later ones.
STAGE_INPUTS = {
    1: "corpus corpus_opts datadir corpus_inputs", 2: "seed", 3: "model pretrained token_type nbpe train_config",
    4: "max_epoch", 5: "nf4_blocksize nf4_double_quant nf4_min_conv_numel nf4_embeddings nf4_unquantised_dtype",
    6: "lora_r lora_alpha lora_targets whisper_window target_style sat_epochs sat_lr sat_utts sat_nproc sat_init "
       "sat_max_duration sat_speed_perturb saml_experts saml_epochs saml_router_epochs saml_router_holdout",
    7: "sa_epochs sa_utts sa_lr sa_lr_schedule sa_holdout ctc_weight unsup unsup_keep unsup_holdout unsup_labeller "
       "unsup_rounds unsup_token_floor unsup_prior",
    8: "beam_size whisper_max_tokens_per_second", 9: "",
}
# Options added after markers were first written, with the value that does what pqm did before them: a marker
# that does not record one counts as done with that value.
ADDED_LATER = {"nf4_unquantised_dtype": "float32", "sat_max_duration": "0", "sa_utts": "0", "saml_experts": "0",
               "saml_epochs": "2", "saml_router_epochs": "1", "saml_router_holdout": "false", "unsup_holdout": "0",
               "unsup_labeller": "nf4_sat", "unsup_rounds": "1", "unsup_token_floor": "0",
               "unsup_prior": "0", "sat_speed_perturb": ""}
# The values run.sh's options may take (the whole value matches), and what to give instead.
RULES = {
    "stage stop_stage": ("[1-9]", "stages are 1..9"),
    "nj ngpu sat_epochs sa_epochs saml_epochs saml_router_epochs lora_r lora_alpha beam_size unsup_rounds": ("[1-9][0-9]*", "a positive integer is needed"),
    "threads sat_nproc sa_holdout unsup_holdout sa_utts saml_experts unsup_prior": ("[0-9]+", "a number >= 0 is needed"),
    "whisper_max_tokens_per_second sat_max_duration": ("[0-9]+([.][0-9]+)?", "a number >= 0 is needed"),
    "sat_speed_perturb": ("family||[0-9]+([.][0-9]+)?( [0-9]+([.][0-9]+)?)*",
                          "speed factors separated by spaces are needed, e.g. \"0.9 1.0 1.1\" (\"\": off; family: "
                          "the model family's)"),
    "unsup_keep": ("0?[.][0-9]*[1-9][0-9]*|1|1[.]0*", "a fraction in (0, 1] is needed"),
    "unsup_token_floor": ("0|0?[.][0-9]+", "a probability in [0, 1) is needed (0: off)"),
    "nf4_double_quant nf4_embeddings unsup saml_router_holdout": ("true|false", "use true or false"),
    "nf4_unquantised_dtype": ("|float32|float16", "use float32 or float16"),
    "whisper_window": ("padded|trimmed", "use padded or trimmed"),
    "target_style": ("corpus|sentence|model", "use corpus, sentence or model"),
    "sat_init": ("zero|svd", "use zero or svd"),
    "unsup_labeller": ("nf4_sat|saml", "use nf4_sat or saml"),
    "sa_lr_schedule": ("constant|linear", "use constant or linear"),
    "cmd_backend": ("local|slurm", "use local or slurm"),
}


def parse_options(text: str) -> dict[str, str]:
    """``--name value`` lines (``--name`` alone: empty) -> {name: value}, names with underscores."""
    options = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if not re.fullmatch("--[a-z][a-z0-9-]*", name):
            raise BadInput(f"--options: expected '--name value' lines, got {line!r}")
        options[name[2:].replace("-", "_")] = value
    return options


def validate(options: dict[str, str]) -> None:
    """Raise on the first option whose value :data:`RULES` does not allow."""
    for names, (pattern, advice) in RULES.items():
        for name in names.split():
            if name in options and not re.fullmatch(pattern, options[name]):
                raise BadInput(f"--{name.replace('_', '-')} {options[name]}: {advice}")


def by_stage(options: dict[str, str]) -> dict[int, list[str]]:
    """The ``--name value`` lines each stage's outputs depend on (:data:`STAGE_INPUTS`)."""
    missing = [name for names in STAGE_INPUTS.values() for name in names.split() if name not in options]
    if missing:
        raise BadInput(f"--options lacks {', '.join(missing)}, which the stages depend on")
    return {n: [f"--{name.replace('_', '-')} {options[name]}" for name in names.split()]
            for n, names in STAGE_INPUTS.items()}


class Markers:
    """The done markers of one experiment folder, against this run's options."""

    def __init__(self, expdir: Path, options: dict[int, list[str]]):
        self.folder = expdir / ".done"
        self.options = options

    def marker(self, n: int) -> Path:
        return self.folder / f"stage{n}"

    def expected(self, n: int) -> list[str]:
        """The lines stage ``n``'s marker holds when it was done with this run's options."""
        return [line for m in range(1, n + 1) for line in self.options[m]]

    def changed(self, n: int) -> str:
        """Empty if stage ``n``'s marker records this run's options (or nothing), else ``was ...; now ...``."""
        marker = self.marker(n)
        if not marker.exists() or marker.stat().st_size == 0:
            return ""
        was, now = marker.read_text(encoding="utf-8").splitlines(), self.expected(n)
        recorded, expected = {x.partition(" ")[0] for x in was}, {x.partition(" ")[0] for x in now}
        was += [f"{name} {value}" for name, value in ((f"--{k.replace('_', '-')}", v) for k, v in ADDED_LATER.items())
                if name in expected and name not in recorded]
        gone, new = [x for x in was if x not in now], [x for x in now if x not in was]
        if not gone and not new:
            return ""
        return f"was {' '.join(gone) or '(unset)'}; now {' '.join(new) or '(unset)'}"

    def check(self, first: int) -> None:
        """Raise if a stage before ``first`` was done with other options than this run's."""
        for n in range(1, first):
            if changed := self.changed(n):
                raise BadInput(f"stage {n} was done with other options ({changed}): rerun from there (./run.sh "
                               f"--stage {n} with these options), or give the options it was run with "
                               f"({self.folder.parent}/run.cmd)")

    def begin(self, n: int, title: str) -> bool:
        """Whether stage ``n`` must run; if so, its marker and the later ones are removed."""
        changed = self.changed(n)
        if self.marker(n).exists() and not changed:
            log.info(f"Stage {n}: {title}: already done (remove {self.marker(n)} to redo)")
            return False
        if changed:
            log.info(f"Stage {n}: options changed since it was done ({changed}): redoing it and the later stages")
        log.info(f"Stage {n}: {title}")
        for later in range(n, LAST_STAGE + 1):
            self.marker(later).unlink(missing_ok=True)
        return True

    def done(self, n: int, seconds: int) -> None:
        """Record stage ``n`` as done with this run's options, and its wall time."""
        write_text(self.folder.parent / "timing" / f"stage{n}.seconds", f"{seconds}\n")
        write_text(self.marker(n), "".join(f"{line}\n" for line in self.expected(n)))
        log.info(f"Stage {n} done in {seconds} s")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--expdir", type=Path, help="the experiment folder (all but validate)")
    p.add_argument("--options", required=True, help="one '--name value' line per run.sh option")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("validate")
    sub.add_parser("check").add_argument("first", type=int)
    begin = sub.add_parser("begin")
    begin.add_argument("stage", type=int)
    begin.add_argument("title")
    done = sub.add_parser("done")
    done.add_argument("stage", type=int)
    done.add_argument("seconds", type=int)
    a = p.parse_args(argv)
    handler = logging.StreamHandler(sys.stdout)  # beside run.sh's own lines; errors go to stderr (cli)
    handler.setFormatter(logging.Formatter("%(asctime)s (%(name)s) %(message)s", "%Y-%m-%dT%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    options = parse_options(a.options)
    if a.command == "validate":
        return validate(options)
    if a.expdir is None:
        p.error(f"{a.command} needs --expdir")
    markers = Markers(a.expdir, by_stage(options))
    if a.command == "check":
        markers.check(a.first)
    elif a.command == "begin":
        if not markers.begin(a.stage, a.title):
            sys.exit(ALREADY_DONE)
    else:
        markers.done(a.stage, a.seconds)


if __name__ == "__main__":
    cli(main)

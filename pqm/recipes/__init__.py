"""Corpus recipes: each corpus is one module here that owns stages 1 and 2.

A corpus module has, in lhotse's shape (``download_<corpus>``/``prepare_<corpus>``
below them where lhotse has none):

- ``add_options(parser)``: the corpus's own options, with their defaults
  (``run.sh --corpus-opts "..."``, the way ESPnet's asr.sh passes
  ``--local_data_opts`` to ``local/data.sh``);
- ``download(a) -> Path | None``: stage 1, the corpus folder (found, or
  downloaded when absent); ``a`` holds ``datadir``, ``seed`` and its options;
- ``prepare(a, corpus_dir)``: stage 2, the lhotse manifests of every set and
  ``speakers.json`` under ``<datadir>/manifests`` (:mod:`pqm.manifests`);
- ``TOKEN_TYPE``: the Conformer's default tokens (``word`` or ``bpe``);
- ``SPLIT_DIGITS``: whether Whisper's scoring counts every digit as a word
  (the digit task, and corpora whose references spell digit strings out);
  otherwise Whisper's English normaliser alone, as published Whisper results;
- optionally ``inputs_digest(a) -> str``: a digest of inputs that no option
  names (the tables of ``--corpus custom``), recorded in stage 1's done marker.

To add a corpus: write ``pqm/recipes/<name>.py`` and add one line to ``CORPORA``.
``python -m pqm.recipes --corpus NAME --help`` lists a corpus's options.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shlex
from pathlib import Path
from types import ModuleType

from pqm.errors import BadInput, require
from pqm.files import read_json, write_json

CORPORA = {
    "fsdd": "pqm.recipes.connected_digits",  # FSDD (pqm.recipes.fsdd) as the connected-digit task
    "speechocean762": "pqm.recipes.speechocean762",
    "librispeech": "pqm.recipes.librispeech",
    "tedlium3": "pqm.recipes.tedlium3",
    "custom": "pqm.recipes.custom",
}
CORPUS_FILE = "corpus.json"  # <datadir>/corpus.json: stage 1's record of the corpus folder
SCORING_FILE = "scoring.json"  # <datadir>/manifests/scoring.json: stage 2's scoring normalisation


def corpus(name: str) -> ModuleType:
    """The module of corpus ``name``."""
    if name not in CORPORA:
        raise BadInput(f"--corpus {name}: use one of {', '.join(CORPORA)} (or add yours to pqm.recipes.CORPORA)")
    return importlib.import_module(CORPORA[name])


def corpus_parser(name: str) -> argparse.ArgumentParser:
    """The parser of corpus ``name``'s own options (what ``--corpus-opts`` holds); its help is the module's doc."""
    p = argparse.ArgumentParser(prog=f"--corpus {name} --corpus-opts", add_help=False, description=corpus(name).__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    corpus(name).add_options(p)
    return p


def corpus_options(name: str, datadir: Path, seed: int, opts: str) -> argparse.Namespace:
    """Parse corpus ``name``'s options from the string ``opts`` (shell quoting allowed)."""
    p = corpus_parser(name)
    try:
        words = shlex.split(opts)
    except ValueError as e:
        raise BadInput(f"--corpus-opts {opts!r}: {e}") from None
    a, unknown = p.parse_known_args(words)
    if unknown:
        raise BadInput(f"--corpus-opts: {' '.join(unknown)} is not an option of --corpus {name}; its options are "
                       f"listed by: python -m pqm.recipes --corpus {name} --help")
    a.datadir, a.seed, a.corpus = datadir, seed, name
    return a


def split_digits(manifest_dir: Path) -> bool:
    """Stage 2's scoring rule for this data (data prepared before it was recorded: digits split, as then)."""
    path = Path(manifest_dir) / SCORING_FILE
    return read_json(path)["split_digits"] if path.exists() else True


def download(a: argparse.Namespace) -> None:
    """Stage 1: find or download the corpus and record where it is."""
    corpus_dir = corpus(a.corpus).download(a)
    if corpus_dir:
        logging.info(f"corpus: {corpus_dir}")
    a.datadir.mkdir(parents=True, exist_ok=True)
    write_json(a.datadir / CORPUS_FILE, {"corpus": a.corpus, "corpus_dir": str(corpus_dir) if corpus_dir else None})


def prepare(a: argparse.Namespace) -> None:
    """Stage 2: the corpus's manifests, and its scoring rule beside them."""
    record = read_json(require(a.datadir / CORPUS_FILE, "stage 1 (the corpus)"))
    if record["corpus"] != a.corpus:
        raise BadInput(f"{a.datadir / CORPUS_FILE} is of --corpus {record['corpus']}, not {a.corpus}: "
                       f"rerun stage 1, or use another --datadir")
    module = corpus(a.corpus)
    module.prepare(a, Path(record["corpus_dir"]) if record["corpus_dir"] else None)
    write_json(a.datadir / "manifests" / SCORING_FILE, {"corpus": a.corpus, "split_digits": module.SPLIT_DIGITS})

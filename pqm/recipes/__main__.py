"""Stages 1 and 2 of every corpus: ``python -m pqm.recipes {check,download,prepare} --corpus NAME ...``.

``check`` parses the corpus's options before anything is written and prints
what run.sh needs from the corpus (its default token type; a digest of inputs
no option names, for the done markers); ``download`` is stage 1, ``prepare``
stage 2. ``python -m pqm.recipes --corpus NAME --help`` lists NAME's options.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pqm.errors import cli, setup_logging
from pqm.recipes import CORPORA, corpus, corpus_options, corpus_parser, download, prepare


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                add_help=False)
    p.add_argument("step", nargs="?", choices=("check", "download", "prepare"))
    p.add_argument("--corpus", default="fsdd", choices=list(CORPORA))
    p.add_argument("--datadir", type=Path, default=Path("data"), help="output: <datadir>/manifests (and audio)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus-opts", default="", help="the corpus's own options, as one string")
    p.add_argument("-h", "--help", action="store_true")
    a = p.parse_args(argv)
    if a.help or a.step is None:
        p.print_help()
        print(f"\n--corpus {a.corpus}:\n")
        corpus_parser(a.corpus).print_help()
        return
    setup_logging()
    opts = corpus_options(a.corpus, a.datadir, a.seed, a.corpus_opts)
    if a.step == "check":
        module = corpus(a.corpus)
        digest = module.inputs_digest(opts) if hasattr(module, "inputs_digest") else "-"
        print(f"token_type {module.TOKEN_TYPE}\ninputs {digest}")
    elif a.step == "download":
        download(opts)
    else:
        prepare(opts)


if __name__ == "__main__":
    cli(main)

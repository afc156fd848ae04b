"""The corpus registry (pqm.recipes): each corpus owns stages 1-2 and its options, and states its scoring rule."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FSDD, ROOT
from pqm.errors import BadInput, MissingInput
from pqm.recipes import CORPORA, corpus, corpus_options, download, prepare, split_digits


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_every_corpus_has_the_interface(name):
    module = corpus(name)
    assert module.TOKEN_TYPE in ("word", "bpe") and isinstance(module.SPLIT_DIGITS, bool)
    assert callable(module.add_options) and callable(module.download) and callable(module.prepare)


def test_corpus_options_are_parsed_with_shell_quoting(tmp_path):
    a = corpus_options("custom", tmp_path, 3, "--train-data 'my data/train' --adapt-data a --eval-data e")
    assert a.train_data == Path("my data/train") and a.valid_fraction == 0.05 and a.seed == 3
    a = corpus_options("fsdd", tmp_path, 0, "--train-speakers jackson theo --max-digits 2")
    assert a.train_speakers == ["jackson", "theo"] and a.max_digits == 2 and a.test_speakers == ["george", "nicolas"]
    with pytest.raises(BadInput, match=r"--speechocean-dir x is not an option of --corpus speechocean762"):
        corpus_options("speechocean762", tmp_path, 0, "--speechocean-dir x")
    with pytest.raises(BadInput, match="No closing quotation"):
        corpus_options("fsdd", tmp_path, 0, "--corpus-dir 'x")
    with pytest.raises(BadInput, match="--corpus nosuch: use one of fsdd, speechocean762"):
        corpus("nosuch")


def test_scoring_rule_per_corpus():
    """Digits count one by one on the digit task and speechocean762; LibriSpeech and TED-LIUM keep numbers whole."""
    from pqm.families.whisper import text_normaliser

    split = {name: corpus(name).SPLIT_DIGITS for name in CORPORA}
    assert split == {"fsdd": True, "speechocean762": True, "librispeech": False, "tedlium3": False, "custom": False}
    assert text_normaliser(split_digits=True)("In 1990 he was four two.") == "in 1 9 9 0 he was 4 2"
    assert text_normaliser(split_digits=False)("In 1990 he was four two.") == "in 1990 he was 42"


def test_stages_1_and_2_record_the_corpus_and_its_scoring_rule(tmp_path):
    opts = corpus_options("fsdd", tmp_path / "data", 0, f"--corpus-dir {FSDD} --train-speakers jackson "
                          "--test-speakers george --train-per-speaker 3 --adapt-per-digit 6 --adapt-per-speaker 2")
    with pytest.raises(MissingInput, match=r"corpus.json; it is made by stage 1"):
        prepare(opts)
    download(opts)
    prepare(opts)
    manifests = tmp_path / "data" / "manifests"
    assert split_digits(manifests) is True
    assert (manifests / "fsdd_cuts_train.jsonl.gz").is_file()
    other = corpus_options("speechocean762", tmp_path / "data", 0, "")
    with pytest.raises(BadInput, match="is of --corpus fsdd, not speechocean762"):
        prepare(other)
    assert split_digits(tmp_path) is True  # data prepared before the rule was recorded: digits split, as then


def test_missing_corpus_folder_and_data_sets_are_named(tmp_path):
    with pytest.raises(BadInput, match="nowhere does not exist"):
        download(corpus_options("speechocean762", tmp_path, 0, f"--corpus-dir {tmp_path / 'nowhere'}"))
    with pytest.raises(BadInput, match="--corpus custom needs --adapt-data"):
        download(corpus_options("custom", tmp_path, 0, f"--train-data {tmp_path}"))


def test_cli_lists_a_corpus_options_and_checks_them():
    run = lambda *args: subprocess.run([sys.executable, "-m", "pqm.recipes", *args], cwd=ROOT,  # noqa: E731
                                       capture_output=True, text=True)
    help_text = run("--corpus", "librispeech", "--help")
    assert help_text.returncode == 0 and "--train-part" in help_text.stdout and "--adapt-per-speaker" in help_text.stdout
    check = run("check", "--corpus", "speechocean762", "--corpus-opts", "--adapt-per-speaker 5")
    assert check.returncode == 0 and check.stdout.splitlines() == ["token_type bpe", "inputs -"]
    bad = run("check", "--corpus", "fsdd", "--corpus-opts", "--fsdd-dir x")
    assert bad.returncode != 0 and "--fsdd-dir x is not an option of --corpus fsdd" in bad.stderr


def test_check_stays_light():
    """run.sh runs 'check' at every start: it imports neither lhotse nor torch (4-5 s a start, 35 in the tests)."""
    code = ("import sys; from pqm.recipes.__main__ import main; "
            "[main(['check', '--corpus', c]) for c in ('fsdd', 'speechocean762', 'librispeech', 'tedlium3')]; "
            "heavy = sorted({'lhotse', 'torch'} & set(sys.modules)); assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr

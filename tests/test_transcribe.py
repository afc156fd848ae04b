"""pqm.transcribe's inputs and refusals (the hypotheses themselves: tests/test_recipe.py)."""

from __future__ import annotations

import shutil

import pytest

from conftest import FSDD
from pqm.errors import BadInput
from pqm.transcribe import choose_adapter, read_inputs


def test_audio_files_wav_scp_and_cuts(fsdd_dir, tmp_path):
    wav = FSDD / "recordings" / "3_george_7.wav"
    (tmp_path / "wav.scp").write_text(f"u1\t{wav}\nu2 {FSDD / 'recordings' / '4_george_7.wav'}\n")
    cuts = read_inputs([wav, tmp_path / "wav.scp"])
    assert [c.id for c in cuts] == ["3_george_7", "u1", "u2"] and all(c.sampling_rate == 8000 for c in cuts)
    cuts.to_file(tmp_path / "cuts.jsonl.gz")
    assert [c.id for c in read_inputs([tmp_path / "cuts.jsonl.gz"])] == ["3_george_7", "u1", "u2"]


def test_bad_inputs_are_named(fsdd_dir, tmp_path):
    wav = FSDD / "recordings" / "3_george_7.wav"
    with pytest.raises(BadInput, match="given twice"):
        read_inputs([wav, wav])
    (tmp_path / "notes.mp3").write_text("not audio")
    with pytest.raises(BadInput, match="notes.mp3 is not audio that can be read"):
        read_inputs([tmp_path / "notes.mp3"])
    with pytest.raises(FileNotFoundError, match="missing input .*nowhere.wav"):
        read_inputs([tmp_path / "nowhere.wav"])


def test_speaker_ids_never_become_paths_unchecked(tmp_path):
    with pytest.raises(BadInput, match="unsafe speaker id '../sat'"):
        choose_adapter(tmp_path, "../sat", None, None)


def test_speaker_without_adapter_gets_sat(tmp_path):
    (tmp_path / "sat").mkdir()
    (tmp_path / "sat" / "adapter_model.safetensors").write_bytes(b"")
    (tmp_path / "adapters" / "pqm" / "ann").mkdir(parents=True)
    (tmp_path / "adapters" / "pqm" / "ann" / "fallback.json").write_text('{"reason": "no adaptation data"}')
    assert choose_adapter(tmp_path, "ann", None, None) == (tmp_path / "sat", "nf4_sat (no pqm adapter)")
    assert choose_adapter(tmp_path, "bob", None, None)[1] == "nf4_sat (no pqm adapter)"
    assert choose_adapter(tmp_path, None, None, "fp") == (None, "fp")
    shutil.rmtree(tmp_path / "sat")
    with pytest.raises(FileNotFoundError, match="stage 6"):
        choose_adapter(tmp_path, "ann", None, None)

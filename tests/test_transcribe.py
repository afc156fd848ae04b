"""pqm.transcribe and pqm.serve on a tiny real ESPnet Conformer with real peft adapters (random LoRA weights):
inputs and refusals, speakers' adapters and their cache, the HTTP service. That the hypotheses are stage 8's:
tests/test_recipe.py."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import FSDD
from pqm.errors import BadInput
from pqm.transcribe import Transcriber, read_inputs

WAV = FSDD / "recordings" / "3_george_7.wav"


@pytest.fixture(scope="module")
def tiny_exp(tiny_fp_dir, tmp_path_factory) -> Path:
    """fp/, nf4/, sat/ and adapters/pqm/{ann,bob} as the recipe writes them; bob has no adapter (fallback.json)."""
    from pqm.families.espnet import DEFAULT_TARGETS, build_model
    from pqm.lora import LoraSettings, add_lora, save_adapter
    from pqm.nf4 import to_nf4
    from pqm.quantize import main as quantize

    exp = tmp_path_factory.mktemp("exp")
    shutil.copytree(tiny_fp_dir, exp / "fp")
    quantize(["--fp-dir", str(exp / "fp"), "--out", str(exp / "nf4")])
    for seed, folder in enumerate(("sat", "adapters/pqm/ann")):
        model = build_model(exp / "fp").eval()
        base_fingerprint = to_nf4(model, exp / "nf4")
        torch.manual_seed(seed)
        peft_model = add_lora(model, LoraSettings(DEFAULT_TARGETS))
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: a trained adapter changes the output
                param.data.normal_(0, 5.0)
        save_adapter(peft_model, exp / folder, {"base_fingerprint": base_fingerprint, "window": "padded"})
    (exp / "adapters" / "pqm" / "bob").mkdir(parents=True)
    (exp / "adapters" / "pqm" / "bob" / "fallback.json").write_text('{"reason": "no adaptation utterances"}')
    return exp


def test_audio_files_wav_scp_and_cuts(fsdd_dir, tmp_path):
    (tmp_path / "wav.scp").write_text(f"u1\t{WAV}\nu2 {FSDD / 'recordings' / '4_george_7.wav'}\n")
    cuts = read_inputs([WAV, tmp_path / "wav.scp"])
    assert [c.id for c in cuts] == ["3_george_7", "u1", "u2"] and all(c.sampling_rate == 8000 for c in cuts)
    cuts.to_file(tmp_path / "cuts.jsonl.gz")
    assert [c.id for c in read_inputs([tmp_path / "cuts.jsonl.gz"])] == ["3_george_7", "u1", "u2"]


def test_bad_inputs_are_named(fsdd_dir, tmp_path):
    with pytest.raises(BadInput, match="given twice"):
        read_inputs([WAV, WAV])
    (tmp_path / "notes.mp3").write_text("not audio")
    with pytest.raises(BadInput, match="notes.mp3 is not audio that can be read"):
        read_inputs([tmp_path / "notes.mp3"])
    with pytest.raises(FileNotFoundError, match="missing input .*nowhere.wav"):
        read_inputs([tmp_path / "nowhere.wav"])


def test_speakers_adapters_fallback_and_cache(fsdd_dir, tiny_exp):
    model = Transcriber(tiny_exp, beam_size=1, cache=1)
    ann, system = model.adapter_of("ann")
    assert (ann, system) == (tiny_exp / "adapters" / "pqm" / "ann", "pqm")
    assert model.adapter_of("bob") == (tiny_exp / "sat", "nf4_sat (no pqm adapter)")
    assert model.adapter_of("carol")[1] == "nf4_sat (no pqm adapter)"
    with pytest.raises(BadInput, match="unsafe speaker id '../sat'"):
        model.adapter_of("../sat")
    cut = read_inputs([WAV])[0]
    first = model.transcribe([cut], ann)
    bare = model.transcribe([cut], None)
    sat = model.transcribe([cut], tiny_exp / "sat")
    assert len(model.loaded) == 1  # the cache of one: ann was unloaded for SAT
    assert model.transcribe([cut], ann) == first  # and reloads to the same output
    assert bare != first != sat  # three different models
    assert Transcriber(tiny_exp, beam_size=1).transcribe([cut], None) == bare
    assert model.speakers() == {"with_adapter": ["ann"], "loaded": [str(ann)]}


def test_adapter_for_another_base_is_refused(fsdd_dir, tiny_exp, tmp_path):
    from pqm.lora import AdapterMismatch

    other = tmp_path / "other"
    shutil.copytree(tiny_exp / "sat", other)
    meta = json.loads((other / "pqm_adapter.json").read_text())
    (other / "pqm_adapter.json").write_text(json.dumps({**meta, "base_fingerprint": "0" * 64}))
    with pytest.raises(AdapterMismatch, match="retrain it"):
        Transcriber(tiny_exp).transcribe(read_inputs([WAV]), other)


def test_http_service(fsdd_dir, tiny_exp):
    """The aiohttp service answers like the Transcriber, refuses bad requests with a 4xx and keeps serving;
    an adapter written while it runs is used at once."""
    from aiohttp import FormData
    from aiohttp.test_utils import TestClient, TestServer

    from pqm.serve import make_app

    model = Transcriber(tiny_exp, beam_size=1)
    expected = model.transcribe(read_inputs([WAV]), tiny_exp / "adapters" / "pqm" / "ann")["3_george_7"]
    sat = model.transcribe(read_inputs([WAV]), tiny_exp / "sat")["3_george_7"]

    def form(audio: bytes, speaker: str | None = None) -> FormData:
        data = FormData()
        data.add_field("audio", audio, filename="a.wav")
        if speaker is not None:
            data.add_field("speaker", speaker)
        return data

    async def session() -> None:
        async with TestClient(TestServer(make_app(model, max_bytes=200_000))) as client:
            assert (await (await client.get("/health")).json()) == {"status": "ok"}
            reply = await client.post("/transcribe", data=form(WAV.read_bytes(), "ann"))
            assert reply.status == 200
            body = await reply.json()
            assert body["hypothesis"] == expected and body["system"] == "pqm" and body["speaker"] == "ann"
            body = await (await client.post("/transcribe", data=form(WAV.read_bytes(), "dave"))).json()
            assert body["system"] == "nf4_sat (no pqm adapter)" and body["hypothesis"] == sat
            for data, status, message in ((form(b"not audio", "ann"), 400, "is not audio"),
                                          (form(b"", "ann"), 400, "no audio"),
                                          (form(WAV.read_bytes(), "../sat"), 400, "unsafe speaker id"),
                                          (form(b"\0" * 300_000, "ann"), 413, "")):
                reply = await client.post("/transcribe", data=data)
                assert reply.status == status and message in await reply.text(), (status, message)
            shutil.copytree(tiny_exp / "adapters" / "pqm" / "ann", tiny_exp / "adapters" / "pqm" / "dave")
            body = await (await client.post("/transcribe", data=form(WAV.read_bytes(), "dave"))).json()
            assert body["system"] == "pqm" and body["hypothesis"] == expected  # no restart needed
            assert "dave" in (await (await client.get("/speakers")).json())["with_adapter"]

    try:
        asyncio.run(session())
    finally:
        shutil.rmtree(tiny_exp / "adapters" / "pqm" / "dave", ignore_errors=True)

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


def form(audio: bytes, speaker: str | None = None):
    """A POST /transcribe form: the audio file and, if given, the speaker."""
    from aiohttp import FormData

    data = FormData()
    data.add_field("audio", audio, filename="a.wav")
    if speaker is not None:
        data.add_field("speaker", speaker)
    return data


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
    from aiohttp.test_utils import TestClient, TestServer

    from pqm.serve import make_app

    model = Transcriber(tiny_exp, beam_size=1)
    expected = model.transcribe(read_inputs([WAV]), tiny_exp / "adapters" / "pqm" / "ann")["3_george_7"]
    sat = model.transcribe(read_inputs([WAV]), tiny_exp / "sat")["3_george_7"]

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


def test_mixed_speaker_batch_equals_each_speaker_alone(fsdd_dir, tiny_exp):
    """One batch of utterances of different speakers, each through its own adapter (or none), in ESPnet's
    beam search (its beams expand each utterance): every hypothesis is the one decoded with that adapter alone."""
    model = Transcriber(tiny_exp, beam_size=3)
    cuts = read_inputs([FSDD / "recordings" / f"{d}_george_{k}.wav" for d, k in ((3, 7), (5, 1), (8, 2), (0, 4))])
    ann, sat = tiny_exp / "adapters" / "pqm" / "ann", tiny_exp / "sat"
    adapters = [ann, sat, None, ann]
    mixed = model.transcribe_mixed(cuts, adapters)
    alone = {cut.id: model.transcribe([cut], adapter)[cut.id] for cut, adapter in zip(cuts, adapters)}
    assert mixed == alone
    assert model.transcribe([cuts[0]], sat) != model.transcribe([cuts[0]], ann)  # the adapters do differ
    with pytest.raises(BadInput, match="more than the cache holds"):
        Transcriber(tiny_exp, beam_size=1, cache=1).transcribe_mixed(cuts[:2], [ann, sat])


def test_rows_of_a_fallback_sub_batch():
    """Whisper's fallback decodes a sub-batch of copied rows, maybe padded to the window: found in order."""
    from pqm.families.whisper import rows_of

    full = torch.arange(4 * 2 * 3, dtype=torch.float32).reshape(4, 2, 3)
    full[3] = full[1]  # two equal clips: matched in order
    assert rows_of(torch.stack([full[1], full[3]]), full) == [1, 3]
    padded = torch.nn.functional.pad(torch.stack([full[0], full[2]]), (0, 5))
    assert rows_of(padded, full) == [0, 2]
    with pytest.raises(RuntimeError, match="not a row of the batch"):
        rows_of(full[:1] + 1, full)


@pytest.mark.e2e
def test_whisper_mixed_speaker_batch_follows_beams_and_fallback(fsdd_dir, whisper_fp_dir, tmp_path, monkeypatch):
    """tiny.en in NF4 with two adapters: a mixed batch (beam search: each row expanded into beams) gives each
    utterance its adapter's hypothesis alone at temperature 0; with the fallback forced, every pass (the batch,
    then the sub-batch decoded again) sees the adapters of the rows it decodes."""
    import pqm.families.whisper as whisper
    from pqm.lora import LoraSettings, add_lora, save_adapter
    from pqm.nf4 import to_nf4
    from pqm.quantize import main as quantize

    shutil.copytree(whisper_fp_dir, tmp_path / "fp")
    quantize(["--fp-dir", str(tmp_path / "fp"), "--out", str(tmp_path / "nf4")])
    for seed, folder in enumerate(("sat", "adapters/pqm/ann")):
        model = whisper.build_model(tmp_path / "fp").eval()
        base_fingerprint = to_nf4(model, tmp_path / "nf4")
        torch.manual_seed(seed)
        peft_model = add_lora(model, LoraSettings(r".*decoder.*\.(q_proj|v_proj)"))
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.05)
        save_adapter(peft_model, tmp_path / folder, {"base_fingerprint": base_fingerprint, "window": "padded"})
    model = Transcriber(tmp_path, beam_size=2)
    cuts = read_inputs([FSDD / "recordings" / f"{d}_george_{k}.wav" for d, k in ((3, 7), (5, 1), (8, 2))])
    adapters = [tmp_path / "adapters" / "pqm" / "ann", tmp_path / "sat", None]
    monkeypatch.setitem(whisper.DECODING, "temperature", [0.0])
    alone = {cut.id: model.transcribe([cut], adapter)[cut.id] for cut, adapter in zip(cuts, adapters)}
    assert len(set(alone.values())) > 1
    assert model.transcribe_mixed(cuts, adapters) == alone

    seen = []
    from pqm.lora import RowAdapters

    hook = RowAdapters._hook
    monkeypatch.setattr(RowAdapters, "_hook", lambda self, m, a, k: (seen.append(list(self.names)), hook(self, m, a, k))[1])
    monkeypatch.setitem(whisper.DECODING, "temperature", [0.0, 0.5])
    monkeypatch.setitem(whisper.DECODING, "logprob_threshold", 0.0)  # every hypothesis falls back
    model.transcribe_mixed(cuts, adapters)
    names = [model._load(adapters[0]), model._load(adapters[1]), "__base__"]
    assert seen[0] == names and seen[-1] == names  # the first pass and the fallback's

    # saml's rows: weights over both adapters, all active; a row weighted wholly on one is that adapter alone,
    # through the beams and the fallback's sub-batch alike
    monkeypatch.setitem(whisper.DECODING, "temperature", [0.0])
    model.peft.base_model.set_adapter(names[:2])
    rows = [{names[0]: 1.0, names[1]: 0.0}, {names[0]: 0.0, names[1]: 1.0}]
    model.rec.set_window("padded")
    assert model.rec.transcribe(cuts[:2], desc="mixture", adapters=rows) == {c.id: alone[c.id] for c in cuts[:2]}
    seen.clear()
    monkeypatch.setitem(whisper.DECODING, "temperature", [0.0, 0.5])
    model.rec.transcribe(cuts[:2], desc="mixture", adapters=rows)
    assert seen[0] == rows and seen[-1] == rows

    # pqm_unsup labelled by saml (pqm.pseudo_labels with routes): each cut's hypothesis, and its loss as a
    # target, through its own row's mixture; a row wholly on one adapter gives that adapter's alone
    from lhotse import CutSet, SupervisionSegment
    from lhotse.utils import fastcopy

    from pqm.pseudo_labels import pseudo_labelled

    monkeypatch.setitem(whisper.DECODING, "temperature", [0.0])
    two = CutSet.from_cuts(fastcopy(c, supervisions=[SupervisionSegment(c.id, c.recording_id, 0, c.duration, text="")])
                           for c in cuts[:2])
    label = dict(batches_of=whisper.batch_iterator(tmp_path / "fp", "padded"), per_token=whisper.token_loss, keep=1.0)
    _, mixed = pseudo_labelled(model.rec, two, **label, routes=dict(zip(two.ids, rows)))
    for cut, name in zip(two, names):
        model.peft.base_model.set_adapter(name)
        _, one = pseudo_labelled(model.rec, CutSet.from_cuts([cut]), **label)
        assert mixed[cut.id]["hypothesis"] == one[cut.id]["hypothesis"] == alone[cut.id].strip()
        assert mixed[cut.id]["loss"] == pytest.approx(one[cut.id]["loss"], rel=1e-4) and one[cut.id]["loss"] > 0


def test_http_requests_that_arrive_together_share_a_batch(fsdd_dir, tiny_exp):
    """Concurrent requests of different speakers are decoded in one mixed batch, each answered as if alone;
    a bad request among them gets its own error and the others their answers."""
    from aiohttp.test_utils import TestClient, TestServer

    from pqm.serve import make_app

    model = Transcriber(tiny_exp, beam_size=1)
    wavs = [FSDD / "recordings" / f"{d}_george_{k}.wav" for d, k in ((3, 7), (5, 1), (8, 2))]
    speakers = ["ann", "bob", None]  # bob has no adapter: SAT
    expected = [model.transcribe(read_inputs([w]), model.adapter_of(s)[0])[w.stem] for w, s in zip(wavs, speakers)]

    async def session() -> None:
        app = make_app(model, max_bytes=200_000, batch_window=0.5, batch_size=8)
        async with TestClient(TestServer(app)) as client:
            posts = [client.post("/transcribe", data=form(w.read_bytes(), s)) for w, s in zip(wavs, speakers)]
            posts.append(client.post("/transcribe", data=form(b"\0" * 1000, "ann")))  # not audio: refused at once
            replies = await asyncio.gather(*posts)
            bodies = [await r.json() for r in replies[:3]]
            assert [b["hypothesis"] for b in bodies] == expected
            assert [b["system"] for b in bodies] == ["pqm", "nf4_sat (no pqm adapter)", "nf4"]
            assert all(b["batch"] == 3 for b in bodies)
            assert replies[3].status == 400
            # eve's adapter is for another base: the batch fails, then each request is decoded alone
            replies = await asyncio.gather(*(client.post("/transcribe", data=form(wavs[0].read_bytes(), s))
                                             for s in ("ann", "eve")))
            body = await replies[0].json()
            assert body["hypothesis"] == expected[0] and body["batch"] == 1
            assert replies[1].status == 400 and "retrain it" in await replies[1].text()

    eve = tiny_exp / "adapters" / "pqm" / "eve"
    shutil.copytree(tiny_exp / "sat", eve)
    meta = json.loads((eve / "pqm_adapter.json").read_text())
    (eve / "pqm_adapter.json").write_text(json.dumps({**meta, "base_fingerprint": "0" * 64}))
    try:
        asyncio.run(session())
    finally:
        shutil.rmtree(eve)

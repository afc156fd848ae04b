"""Stage 3: Kaldi-style data dirs for ESPnet and the token list (words or sentencepiece BPE).

Reads ``<datadir>/manifests/<corpus>_{recordings,supervisions,cuts}_<set>.jsonl.gz``
and writes ``<datadir>/<set>/{wav.scp,text,utt2spk,spk2utt}`` plus
``<datadir>/token_list/<word|bpe_unigramN>/tokens.txt`` (and ``bpe.model``).
ESPnet reads each ``wav.scp`` entry whole, so a set whose utterances are
segments of longer recordings (TED-LIUM talks, Kaldi ``segments``) or not at
16 kHz WAVE is written out first, one 16 kHz WAVE file per utterance under
``<datadir>/<set>/audio`` (what ESPnet's ``asr.sh`` does in its format stage).
Every transcript is checked against the token list here, so a bad one fails
before any training starts.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import soundfile as sf
from lhotse import AudioSource, CutSet, Recording, RecordingSet, SupervisionSegment, SupervisionSet
from lhotse.kaldi import export_to_kaldi
from tqdm import tqdm

from pqm.batches import SAMPLING_RATE, at_16k
from pqm.errors import check_safe_id, cli, setup_logging
from pqm.files import atomic_path, write_text
from pqm.manifests import SETS, load_set, manifest_path
from pqm.tokens import TOKEN_TYPES, TokenEncoder, build_token_list, check_word_transcripts, token_dir_name, train_bpe


def whole_16k_files(recs: RecordingSet, sups: SupervisionSet) -> bool:
    """True if every utterance is a whole 16 kHz one-channel WAVE file (ESPnet can read it as it is)."""
    by_id = {r.id: r for r in recs}
    for sup in sups:
        rec = by_id[sup.recording_id]
        if (rec.sampling_rate != SAMPLING_RATE or abs(sup.duration - rec.duration) > 0.01 or sup.start > 0.01
                or len(rec.sources) != 1 or rec.sources[0].type != "file" or rec.num_channels != 1
                or Path(rec.sources[0].source).suffix.lower() != ".wav"):
            return False
    return True


def dump_utterances(cuts: CutSet, audio_dir: Path, final_dir: Path) -> tuple[RecordingSet, SupervisionSet]:
    """Write each cut as a 16 kHz WAVE file in ``audio_dir`` (to be moved to ``final_dir``); return their manifests."""
    audio_dir.mkdir(parents=True)
    recs, sups = [], []
    for cut in tqdm(at_16k(cuts), desc=f"writing {final_dir}", unit="utt", mininterval=5):
        name = f"{check_safe_id(cut.id, 'utterance id')}.wav"
        audio = cut.load_audio()[0]
        sf.write(audio_dir / name, audio, SAMPLING_RATE, subtype="PCM_16")
        duration = len(audio) / SAMPLING_RATE
        recs.append(Recording(id=cut.id, sources=[AudioSource(type="file", channels=[0], source=str(final_dir / name))],
                              sampling_rate=SAMPLING_RATE, num_samples=len(audio), duration=duration))
        sup = cut.supervisions[0]
        sups.append(SupervisionSegment(id=cut.id, recording_id=cut.id, start=0.0, duration=duration,
                                       channel=0, text=sup.text, speaker=sup.speaker, language=sup.language))
    return RecordingSet.from_recordings(recs), SupervisionSet.from_segments(sups)


def write_spk2utt(data_dir: Path) -> None:
    """Write Kaldi's ``spk2utt`` from ``utt2spk``."""
    spk2utt: dict[str, list[str]] = {}
    for line in (data_dir / "utt2spk").read_text(encoding="utf-8").splitlines():
        utt, spk = line.split()
        spk2utt.setdefault(spk, []).append(utt)
    lines = [f"{spk} {' '.join(utts)}" for spk, utts in sorted(spk2utt.items())]
    (data_dir / "spk2utt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_espnet_data(datadir: Path, corpus: str, token_type: str, nbpe: int) -> None:
    """The Kaldi data dir of every set and the token list, from stage 2's manifests."""
    manifests = datadir / "manifests"
    sets = {name: load_set(manifests, corpus, name) for name in SETS}
    train_texts = [s.text or "" for s in sets["train"][1]]
    token_dir = datadir / "token_list" / token_dir_name(token_type, nbpe)
    with atomic_path(token_dir) as tmp:
        tmp.mkdir(parents=True)
        if token_type == "bpe":
            tokens = train_bpe(train_texts, nbpe, tmp)
            tokenizer = TokenEncoder(tokens, "bpe", tmp / "bpe.model")
        else:
            check_word_transcripts((f"utterance {sup.id} in {manifest_path(manifests, corpus, 'supervisions', name)}",
                                    sup.text or "") for name, (_, sups) in sets.items() for sup in sups)
            tokens = build_token_list(train_texts)
            write_text(tmp / "tokens.txt", "\n".join(tokens) + "\n")
            tokenizer = TokenEncoder(tokens)
        for name, (recs, sups) in sets.items():
            where = manifest_path(manifests, corpus, "supervisions", name)
            for sup in sups:
                tokenizer.encode(sup.text or "", where=f"utterance {sup.id} in {where}")
    for name, (recs, sups) in sets.items():
        final = datadir / name
        with atomic_path(final) as tmp:
            if not whole_16k_files(recs, sups):
                cuts = CutSet.from_file(manifest_path(manifests, corpus, "cuts", name))
                recs, sups = dump_utterances(cuts, tmp / "audio", final.resolve() / "audio")
            export_to_kaldi(recs, sups, tmp)
            write_spk2utt(tmp)
        logging.info(f"wrote Kaldi data dir {final} ({len(sups)} utterances)")
    logging.info(f"token list: {token_dir / 'tokens.txt'} ({len(tokens)} tokens)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datadir", type=Path, required=True)
    p.add_argument("--corpus", default="fsdd", help="manifest prefix (stage 2)")
    p.add_argument("--token-type", default="word", choices=TOKEN_TYPES)
    p.add_argument("--nbpe", type=int, default=500, help="--token-type bpe: sentencepiece vocabulary size")
    a = p.parse_args(argv)
    setup_logging()
    write_espnet_data(a.datadir, a.corpus, a.token_type, a.nbpe)


if __name__ == "__main__":
    cli(main)

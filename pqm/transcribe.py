"""Transcribe new audio with a recipe's models: the NF4 base plus a speaker's own adapter.

    python -m pqm.transcribe --expdir exp/speechocean762_whisper --speaker 1031 a.wav b.flac
    python -m pqm.transcribe --expdir EXP --speaker 1031 --format jsonl --out hyps.jsonl data/x/wav.scp
    python -m pqm.transcribe --expdir EXP --system nf4_sat cuts.jsonl.gz

Inputs: audio files (any format and rate libsndfile reads; resampled to
16 kHz), Kaldi ``wav.scp`` tables (``id path``) or lhotse cut manifests
(``*.jsonl.gz``). The model is the experiment folder's NF4 base (``nf4/``,
rebuilt on the ``fp/`` model it was made from) with:

- ``--speaker NAME``: that speaker's ``pqm`` adapter (stage 7); a speaker
  without one (no adaptation data, or adaptation did no good on held-out
  speech) gets the SAT adapter, and the output says so;
- ``--adapter DIR``: any adapter folder trained on this base;
- ``--system fp|nf4|nf4_sat``: the speaker-independent systems.

Every adapter is checked against the base's fingerprint, as in decoding, and
decoded in the input window it was trained in. Output: Kaldi ``text`` lines,
or JSON lines (utterance, speaker, system, adapter, hypothesis, seconds).
Whisper refuses audio over 30 s with the file named (no long-form decoding yet).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from lhotse import CutSet, Recording
from lhotse.audio.utils import AudioLoadingError

from pqm.decode import adapter_window
from pqm.errors import BadInput, check_safe_id, cli, require, setup_logging
from pqm.families import family
from pqm.files import read_json
from pqm.kaldi_table import read_table
from pqm.lora import load_adapter
from pqm.nf4 import to_nf4

SYSTEMS = ("fp", "nf4", "nf4_sat")


def read_inputs(paths: list[Path]) -> CutSet:
    """One cut per audio file, ``wav.scp`` line or cut of a manifest; ids must be unique."""
    cuts = []
    for path in paths:
        require(path)
        if path.name.endswith((".jsonl.gz", ".jsonl")):
            cuts += list(CutSet.from_file(path))
        elif path.name == "wav.scp" or path.suffix == ".scp":
            cuts += [_audio_cut(Path(audio), utt, path) for utt, audio in read_table(path).items()]
        else:
            cuts.append(_audio_cut(path, path.stem, path))
    ids = [c.id for c in cuts]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise BadInput(f"utterance ids {twice[:3]} are given twice: rename the files or the wav.scp keys")
    if not cuts:
        raise BadInput("no audio to transcribe")
    return CutSet.from_cuts(cuts)


def _audio_cut(audio: Path, utt: str, named_in: Path):
    """A cut of one whole audio file (channel 0 of mono audio only)."""
    try:
        rec = Recording.from_file(require(audio, f"{named_in}"), recording_id=utt)
    except (RuntimeError, AudioLoadingError) as err:  # libsndfile's and lhotse's: not audio they can read
        raise BadInput(f"{audio} is not audio that can be read ({err})") from None
    if rec.num_channels != 1:
        raise BadInput(f"{audio} has {rec.num_channels} channels: mix it down to mono first")
    return rec.to_cut()


def choose_adapter(expdir: Path, speaker: str | None, adapter: Path | None, system: str | None) -> tuple[Path | None, str]:
    """(adapter folder or None for the bare model, what to call it in the output)."""
    if adapter is not None:
        return require(adapter / "adapter_model.safetensors").parent, str(adapter)
    if speaker is not None:
        own = expdir / "adapters" / "pqm" / check_safe_id(speaker)
        if (own / "adapter_model.safetensors").exists():
            return own, "pqm"
        why = read_json(own / "fallback.json").get("reason", "") if (own / "fallback.json").exists() \
            else "no adapter of this speaker"
        logging.warning(f"speaker {speaker}: {why}; using the SAT adapter (nf4_sat)")
        return require(expdir / "sat" / "adapter_model.safetensors", "stage 6").parent, "nf4_sat (no pqm adapter)"
    if system == "nf4_sat":
        return require(expdir / "sat" / "adapter_model.safetensors", "stage 6").parent, "nf4_sat"
    return None, system or "nf4"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", type=Path, help="audio files, wav.scp tables or lhotse cut manifests")
    p.add_argument("--expdir", type=Path, required=True, help="a recipe's experiment folder (fp/, nf4/, sat/, adapters/)")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--speaker", help="use this speaker's adapter (stage 7), or SAT where there is none")
    who.add_argument("--adapter", type=Path, help="an adapter folder trained on this base")
    who.add_argument("--system", choices=SYSTEMS, help="a speaker-independent system (default: nf4)")
    p.add_argument("--beam-size", type=int, default=1, help="(stage 8 decodes with run.sh's --beam-size)")
    p.add_argument("--ctc-weight", type=float, default=0.5, help="Conformer: CTC weight of the beam search")
    p.add_argument("--format", choices=("text", "jsonl"), default="text")
    p.add_argument("--out", type=Path, default=None, help="output file (default: standard output)")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    setup_logging()
    if a.beam_size < 1:
        p.error(f"--beam-size {a.beam_size}: a positive integer is needed")
    cuts = read_inputs(a.inputs)
    adapter, name = choose_adapter(a.expdir, a.speaker, a.adapter, a.system)
    fp_dir = require(a.expdir / "fp", "stage 4")
    rec = family(fp_dir).recognizer(fp_dir, a.device, a.beam_size, a.ctc_weight)
    if a.system != "fp":
        base_fingerprint = to_nf4(rec.model, require(a.expdir / "nf4", "stage 5"), device=a.device)
        if adapter is not None:
            load_adapter(rec.model, adapter, base_fingerprint, name="speaker").set_adapter("speaker")
    rec.set_window(adapter_window(adapter) if adapter is not None else "padded")
    lines = []
    for cut in cuts:
        start = time.time()
        hyp = rec.transcribe([cut], desc=cut.id)[cut.id]
        if a.format == "text":
            lines.append(f"{cut.id} {hyp}".rstrip())
        else:
            lines.append(json.dumps({"utterance": cut.id, "speaker": a.speaker, "system": name, "hypothesis": hyp,
                                     "seconds": round(time.time() - start, 3)}, ensure_ascii=False))
    text = "\n".join(lines) + "\n"
    if a.out is None:
        sys.stdout.write(text)
    else:
        a.out.write_text(text, encoding="utf-8")
    logging.info(f"transcribed {len(cuts)} utterances with {name}")


def run() -> None:
    """The ``pqm-transcribe`` console script."""
    cli(main)


if __name__ == "__main__":
    run()

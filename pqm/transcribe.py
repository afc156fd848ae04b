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
or JSON lines (utterance, speaker, system, hypothesis, seconds).
Whisper refuses audio over 30 s with the file named (no long-form decoding yet).
:class:`Transcriber` is shared with the HTTP service (``pqm.serve``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from collections import Counter, OrderedDict
from pathlib import Path

from lhotse import CutSet, Recording
from lhotse.audio.utils import AudioLoadingError

from pqm.errors import BadInput, check_safe_id, cli, require, setup_logging
from pqm.families import family
from pqm.files import ids_digest, read_json
from pqm.kaldi_table import read_table
from pqm.lora import BASE, adapter_window, check_adapter, load_adapter
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
            cuts += [audio_cut(Path(audio), utt) for utt, audio in read_table(path).items()]
        else:
            cuts.append(audio_cut(path, path.stem))
    twice = sorted(i for i, n in Counter(c.id for c in cuts).items() if n > 1)
    if twice:
        raise BadInput(f"utterance ids {twice[:3]} are given twice: rename the files or the wav.scp keys")
    if not cuts:
        raise BadInput("no audio to transcribe")
    return CutSet.from_cuts(cuts)


def audio_cut(audio: Path, utt: str):
    """A cut of one whole mono audio file; unreadable, empty or multi-channel audio is refused."""
    try:
        rec = Recording.from_file(require(audio), recording_id=utt)
    except (RuntimeError, AudioLoadingError) as err:  # libsndfile's and lhotse's: not audio they can read
        raise BadInput(f"{audio.name} is not audio that can be read ({err})") from None
    if rec.num_channels != 1:
        raise BadInput(f"{audio.name} has {rec.num_channels} channels: mix it down to mono first")
    if rec.num_samples == 0:
        raise BadInput(f"{audio.name} holds no audio samples")
    return rec.to_cut()


class Transcriber:
    """The experiment's base model (NF4, or fp with ``quantise=False``) and speakers' adapters loaded on
    demand onto it, at most ``cache`` at a time (the least recently used is unloaded)."""

    def __init__(self, expdir: Path, device: str = "cpu", beam_size: int = 1, ctc_weight: float = 0.5,
                 quantise: bool = True, cache: int = 8) -> None:
        self.expdir, self.cache = expdir, max(1, cache)
        fp_dir = require(expdir / "fp", "stage 4")
        self.rec = family(fp_dir).recognizer(fp_dir, device, beam_size, ctc_weight)
        self.base_fingerprint = to_nf4(self.rec.model, require(expdir / "nf4", "stage 5"), device=device) \
            if quantise else None
        self.peft = None
        self.loaded: OrderedDict[str, Path] = OrderedDict()  # peft adapter name -> folder

    def adapter_of(self, speaker: str | None) -> tuple[Path | None, str]:
        """(adapter folder, what to call the system): the speaker's ``pqm`` adapter, else SAT (said in the
        name); no speaker: the bare base model."""
        if speaker is None:
            return None, "nf4" if self.base_fingerprint else "fp"
        own = self.expdir / "adapters" / "pqm" / check_safe_id(speaker)
        if (own / "adapter_model.safetensors").exists():
            return own, "pqm"
        why = read_json(own / "fallback.json").get("reason", "") if (own / "fallback.json").exists() \
            else "no adapter of this speaker"
        logging.info(f"speaker {speaker}: {why}; using the SAT adapter")
        return self.sat(), "nf4_sat (no pqm adapter)"

    def sat(self) -> Path:
        return require(self.expdir / "sat" / "adapter_model.safetensors", "stage 6").parent

    def speakers(self) -> dict[str, list[str]]:
        """Speakers with an adapter on disk now, and the adapters loaded in memory."""
        folder = self.expdir / "adapters" / "pqm"
        on_disk = sorted(p.name for p in folder.iterdir() if (p / "adapter_model.safetensors").exists()) \
            if folder.is_dir() else []
        return {"with_adapter": on_disk, "loaded": [str(p) for p in self.loaded.values()]}

    def _load(self, adapter: Path) -> str:
        """The peft name of ``adapter``, loaded (checked against the base) if it is not in the cache."""
        if self.base_fingerprint is None:
            raise BadInput("adapters need the NF4 base (this transcriber decodes fp)")
        weights = (adapter / "adapter_model.safetensors").stat()  # a rewritten file is a new adapter; no hashing per request
        name = "a" + ids_digest([str(adapter.resolve()), str(weights.st_mtime_ns), str(weights.st_size)])[:16]
        if name not in self.loaded:
            check_adapter(adapter, self.base_fingerprint)
            if len(self.loaded) >= self.cache:
                old, _ = self.loaded.popitem(last=False)
                self.peft.delete_adapter(old)
            self.peft = load_adapter(self.peft if self.peft is not None else self.rec.model, adapter,
                                     self.base_fingerprint, name=name)
        self.loaded[name] = adapter
        self.loaded.move_to_end(name)
        return name

    def preload(self, adapter: Path) -> None:
        """Load ``adapter`` now (checked against the base; it stays in the cache), not at its first use."""
        self._load(adapter)

    def transcribe(self, cuts, adapter: Path | None) -> dict[str, str]:
        """``{utterance id: hypothesis}`` with ``adapter`` (None: the bare base), in its trained window."""
        if adapter is None:
            use = self.peft.disable_adapter() if self.peft is not None else contextlib.nullcontext()
        else:
            name = self._load(adapter)
            self.peft.set_adapter(name)
            use = contextlib.nullcontext()
        with use:
            self.rec.set_window(adapter_window(adapter))
            return self.rec.transcribe(list(cuts), desc="transcribe")

    def transcribe_mixed(self, cuts, adapters: list[Path | None]) -> dict[str, str]:
        """``{utterance id: hypothesis}``, each cut with its own adapter (None: the bare NF4 base) in one batch
        per input window (:class:`pqm.lora.RowAdapters`): the same hypotheses as :meth:`transcribe` gives
        each speaker alone, where decoding is deterministic (see ``pqm.serve``)."""
        cuts, distinct = list(cuts), {a for a in adapters if a is not None}
        if not distinct:
            return self.transcribe(cuts, None)
        if len(distinct) > self.cache:
            raise BadInput(f"{len(distinct)} adapters in one batch, more than the cache holds ({self.cache})")
        window_of = {adapter: adapter_window(adapter) for adapter in (*distinct, None)}  # read once, not per cut
        groups: dict[str, list[int]] = {}
        for k, adapter in enumerate(adapters):
            groups.setdefault(window_of[adapter], []).append(k)
        hyps = {}
        for window, members in groups.items():
            names = [self._load(adapters[k]) if adapters[k] is not None else BASE for k in members]
            self.rec.set_window(window)
            hyps.update(self.rec.transcribe([cuts[k] for k in members], desc="transcribe", adapters=names))
        return hyps


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
    model = Transcriber(a.expdir, a.device, a.beam_size, a.ctc_weight, quantise=a.system != "fp")
    if a.adapter is not None:
        adapter, name = require(a.adapter / "adapter_model.safetensors").parent, str(a.adapter)
    elif a.system == "nf4_sat":
        adapter, name = model.sat(), "nf4_sat"
    else:
        adapter, name = model.adapter_of(a.speaker)
    lines = []
    for cut in cuts:
        start = time.time()
        hyp = model.transcribe([cut], adapter)[cut.id]
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

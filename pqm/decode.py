"""Stage 8: decode one speaker's evaluation utterances with every system.

Systems, in the order they are built on one model object:
``fp`` (full precision), ``nf4`` (quantised), ``nf4_sat`` (+ SAT LoRA),
``nf4_sa`` (+ per-speaker LoRA trained from scratch), ``pqm`` (+ per-speaker
LoRA started from SAT) and, when asked for, ``pqm_unsup`` (the same, trained on
``nf4_sat``'s own hypotheses instead of transcripts). Decoding is ESPnet's beam search (``Speech2Text``) for
a Conformer and ``generate`` for Whisper (each family's ``recognizer``, :mod:`pqm.families`).
Hypotheses go to ``<out>/<system>/<speaker>/text`` (Kaldi ``text`` format),
and ``<out>/<system>/<speaker>/info.json`` records any fallback and the
``run_keys`` of the inputs: a system already decoded from the same models,
utterances and settings is not decoded again, so rerunning the stage redoes
only the speakers (and systems) whose jobs failed.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from pathlib import Path

from lhotse import CutSet

from pqm.errors import BadInput, MissingInput, cli, require, setup_logging
from pqm.families import family
from pqm.files import file_digest, ids_digest, read_json, write_json, write_text
from pqm.jobs import add_speaker_options, job_speaker
from pqm.lora import adapter_window, load_adapter
from pqm.nf4 import to_nf4
from pqm.systems import ADAPTED, DEFAULT_SYSTEMS, SYSTEMS


def write_hyps(out: Path, hyps: dict[str, str] | None, info: dict) -> None:
    """Write a Kaldi ``text`` file of hypotheses and an ``info.json`` beside it.

    ``hyps=None`` records a system that could not be decoded (``info["missing"]``
    says why) and removes any older hypotheses.
    """
    if hyps is None:
        (out / "text").unlink(missing_ok=True)
    else:
        write_text(out / "text", "".join(f"{utt} {hyp}".rstrip() + "\n" for utt, hyp in sorted(hyps.items())))
    write_json(out / "info.json", info)


def _adapter_digest(adapter: Path) -> str | None:
    if (adapter / "fallback.json").exists():
        return "fallback"
    weights = adapter / "adapter_model.safetensors"
    return file_digest(weights) if weights.exists() else None


def run_keys(a: argparse.Namespace, tag: str, cuts: CutSet, systems: list[str]) -> dict[str, dict]:
    """Everything that determines each system's hypotheses of one speaker job: the models it uses (a
    per-speaker system may fall back to SAT), the utterances and the decoding settings. A system is
    decoded again only if its own key changed (``local/data_amounts.sh`` keeps ``fp``, ``nf4`` and
    ``nf4_sat`` while the per-speaker adapters change)."""
    common = {
        "fp": file_digest(require(a.fp_dir / "model.safetensors", "stage 4")),
        "utterances": ids_digest(c.id for c in cuts),
        "beam_size": a.beam_size, "ctc_weight": a.ctc_weight, **family(a.fp_dir).DECODING,
        **({"max_tokens_per_second": a.max_tokens_per_second} if a.max_tokens_per_second else {}),
    }
    nf4 = {"nf4": read_json(a.nf4_dir / "nf4.json", "stage 5")["fingerprint"]}
    sat = {**nf4, "sat": _adapter_digest(a.sat_dir)}
    keys = {"fp": common, "nf4": {**common, **nf4}, "nf4_sat": {**common, **sat}}
    for system in ADAPTED:
        keys[system] = {**common, **sat, system: _adapter_digest(a.adapter_dir / system / tag)}
    return {system: keys[system] for system in systems}


def already_decoded(out: Path, key: dict) -> bool:
    info = out / "info.json"
    return (out / "text").exists() and info.exists() and read_json(info).get("run_key") == key


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--fp-dir", type=Path, required=True)
    p.add_argument("--nf4-dir", type=Path, required=True)
    p.add_argument("--sat-dir", type=Path, required=True, help="SAT adapter (stage 6)")
    p.add_argument("--adapter-dir", type=Path, required=True,
                   help="per-speaker adapters: <dir>/{pqm,nf4_sa,pqm_unsup}/<speaker> (stage 7)")
    p.add_argument("--cuts", type=Path, required=True, help="evaluation cuts")
    p.add_argument("--out", type=Path, required=True)
    add_speaker_options(p, "decode")
    p.add_argument("--systems", nargs="+", default=list(DEFAULT_SYSTEMS), choices=SYSTEMS)
    p.add_argument("--beam-size", type=int, default=4)
    p.add_argument("--ctc-weight", type=float, default=0.5)
    p.add_argument("--max-tokens-per-second", type=float, default=0.0,
                   help="Whisper: at most this many tokens per second of audio (+ 8) per hypothesis (0: 128 tokens)")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    setup_logging()
    speaker = job_speaker(a)
    cuts = CutSet.from_file(require(a.cuts, "stage 2 (manifests)"))
    models = family(a.fp_dir)
    quiet = models.log_filter()
    for handler in logging.getLogger().handlers if quiet else ():
        handler.addFilter(quiet)
    tag = "all"
    if speaker is not None:
        tag = speaker
        cuts = cuts.filter(lambda c: c.supervisions[0].speaker == speaker).to_eager()
    if len(cuts) == 0:
        raise BadInput(f"no utterances of speaker {speaker!r} in {a.cuts}")
    wanted = [s for s in SYSTEMS if s in a.systems]
    keys = run_keys(a, tag, cuts, wanted)
    todo = [s for s in wanted if not already_decoded(a.out / s / tag, keys[s])]
    if not todo:
        logging.info(f"{tag}: {', '.join(wanted)} already decoded from these models and settings: nothing to do")
        return
    rec = models.recognizer(a.fp_dir, a.device, a.beam_size, a.ctc_weight)
    peft_model, base_fingerprint, missing = None, None, []
    for system in SYSTEMS[: SYSTEMS.index(todo[-1]) + 1]:
        info: dict = {"system": system, "speaker": speaker, "run_key": keys.get(system)}
        use = contextlib.nullcontext()
        window = adapter_window(None)  # the base model decodes as it was trained; an adapter, as it was trained
        if system == "nf4":
            base_fingerprint = to_nf4(rec.model, a.nf4_dir, device=a.device)
        elif system == "nf4_sat":
            peft_model = load_adapter(rec.model, a.sat_dir, base_fingerprint, name="sat")
            peft_model.set_adapter("sat")
            window = adapter_window(a.sat_dir)
        elif system in ADAPTED:
            adapter = a.adapter_dir / system / tag
            if (adapter / "fallback.json").exists():  # no adaptation data, or adapting did harm on held-out speech
                fallback = ADAPTED[system].fallback
                reason = read_json(adapter / "fallback.json").get("reason", "")
                logging.warning(f"{system}/{tag}: decoding with {fallback} instead ({reason})")
                info["fallback"] = fallback
                if fallback == "nf4_sat":
                    peft_model.set_adapter("sat")
                    window = adapter_window(a.sat_dir)
                else:
                    use = peft_model.disable_adapter()
            elif not (adapter / "adapter_model.safetensors").exists():  # its stage-7 job failed
                if system in todo:
                    missing.append(system)
                    logging.error(f"{system}/{tag}: no adapter in {adapter}: stage 7 failed or did not run for {tag}; "
                                  "marked as missing, not decoded with another system")
                    write_hyps(a.out / system / tag, None, {**info, "missing": f"no adapter in {adapter} (stage 7)"})
                continue
            else:
                load_adapter(peft_model, adapter, base_fingerprint, name=system)
                peft_model.set_adapter(system)
                window = adapter_window(adapter)
        if system not in todo:
            continue
        start = time.time()
        rec.set_window(window)
        info["window"] = window
        with use:
            hyps = rec.transcribe(cuts, desc=f"{system}/{tag}", tokens_per_second=a.max_tokens_per_second)
        info["seconds"] = round(time.time() - start, 2)
        info["utterances"] = len(hyps)
        write_hyps(a.out / system / tag, hyps, info)
        logging.info(f"{system}/{tag}: decoded {len(hyps)} utterances in {info['seconds']} s")
    if missing:
        raise MissingInput(f"speaker {tag}: no {' or '.join(missing)} adapter (rerun stage 7 for it, then stage 8; "
                           "or score as is with --stage 9: the speaker is marked as missing for these systems)")


if __name__ == "__main__":
    cli(main)

"""Stage 8: decode the evaluation utterances of a job's speakers with every system.

Systems, in the order they are built on one model object (each system decodes
every speaker of the job before the next is built, so a job loads the model
once; a per-speaker adapter is loaded for its speaker and unloaded after):
``fp`` (full precision), ``nf4`` (quantised), ``nf4_sat`` (+ SAT LoRA),
``nf4_sa`` (+ per-speaker LoRA trained from scratch), ``pqm`` (+ per-speaker
LoRA started from SAT) and, when asked for, ``pqm_unsup`` (the same, trained on
``nf4_sat``'s own hypotheses instead of transcripts; one made under the token prior decodes under its
own token bias, :mod:`pqm.pseudo_labels`), ``saml`` (no per-speaker data: each utterance through
its router's mixture of the training speakers' LoRA experts, :mod:`pqm.saml`) and ``saml_sa`` (+ per-speaker
LoRA started from saml's experts merged). Decoding is ESPnet's beam search (``Speech2Text``) for
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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lhotse import CutSet

from pqm.errors import BadInput, MissingInput, cli, require, setup_logging
from pqm.families import family
from pqm.files import file_digest, ids_digest, read_json, write_json, write_text
from pqm.jobs import add_speaker_options, job_speakers
from pqm.lora import META, adapter_window, load_adapter
from pqm.mixture import Mixture, mixture_key
from pqm.nf4 import to_nf4
from pqm.pseudo_labels import biased
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


def _adapter_digest(adapter: Path) -> str | dict | None:
    """The adapter's weights (and the token bias it decodes under, if any), its fallback, or None (missing)."""
    if (adapter / "fallback.json").exists():
        return "fallback"
    weights = adapter / "adapter_model.safetensors"
    if not weights.exists():
        return None
    bias = decode_token_bias(adapter)
    return {"weights": file_digest(weights), "token_bias": bias} if bias else file_digest(weights)


def decode_token_bias(adapter: Path) -> dict[str, float] | None:
    """The token bias a ``pqm_unsup`` adapter made with ``--pseudo-prior-iters`` decodes its speaker under
    (:mod:`pqm.pseudo_labels`), or None."""
    meta = adapter / META
    return read_json(meta).get("decode_token_bias") if meta.exists() else None


def run_keys(a: argparse.Namespace, tag: str, cuts: CutSet, systems: list[str]) -> dict[str, dict]:
    """Everything that determines each system's hypotheses of one speaker job: the models it uses (a
    per-speaker system's adapter, or its fallback), the utterances and the decoding settings. A system is
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
    if "saml" in systems or "saml_sa" in systems:
        keys["saml"] = {**common, **nf4, "saml": mixture_key(a.saml_dir)}
    for system in (s for s in systems if s in ADAPTED):
        keys[system] = {**keys[ADAPTED[system].fallback], system: _adapter_digest(a.adapter_dir / system / tag)}
    return {system: keys[system] for system in systems}


def already_decoded(out: Path, key: dict) -> bool:
    info = out / "info.json"
    return (out / "text").exists() and info.exists() and read_json(info).get("run_key") == key


@dataclass
class Part:
    """One speaker's evaluation utterances in a decoding job (``tag`` "all": every utterance), with each
    system's run key and the systems still to decode."""

    tag: str
    cuts: CutSet
    keys: dict[str, dict]
    todo: list[str]


def job_parts(a: argparse.Namespace, cuts: CutSet, speakers: list[str | None], wanted: list[str]) -> list[Part]:
    """The job's speakers (None: every utterance at once) as parts to decode."""
    parts = []
    for speaker in speakers:
        mine = cuts if speaker is None else cuts.filter(lambda c: c.supervisions[0].speaker == speaker).to_eager()
        if len(mine) == 0:
            raise BadInput(f"no utterances of speaker {speaker!r} in {a.cuts}")
        tag = speaker or "all"
        keys = run_keys(a, tag, mine, wanted)
        todo = [s for s in wanted if not already_decoded(a.out / s / tag, keys[s])]
        if not todo:
            logging.info(f"{tag}: {', '.join(wanted)} already decoded from these models and settings: nothing to do")
        parts.append(Part(tag, mine, keys, todo))
    return parts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--fp-dir", type=Path, required=True)
    p.add_argument("--nf4-dir", type=Path, required=True)
    p.add_argument("--sat-dir", type=Path, required=True, help="SAT adapter (stage 6)")
    p.add_argument("--adapter-dir", type=Path, required=True,
                   help="per-speaker adapters: <dir>/{pqm,nf4_sa,pqm_unsup,saml_sa}/<speaker> (stage 7)")
    p.add_argument("--saml-dir", type=Path, help="saml's experts and router (stage 6 with --saml-experts)")
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
    if {"saml", "saml_sa"} & set(a.systems) and a.saml_dir is None:
        p.error("--systems saml and saml_sa need --saml-dir")
    setup_logging()
    speakers = job_speakers(a)
    cuts = CutSet.from_file(require(a.cuts, "stage 2 (manifests)"))
    models = family(a.fp_dir)
    quiet = models.log_filter()
    for handler in logging.getLogger().handlers if quiet else ():
        handler.addFilter(quiet)
    parts = job_parts(a, cuts, speakers, [s for s in SYSTEMS if s in a.systems])
    todo = [s for s in SYSTEMS if any(s in part.todo for part in parts)]
    if not todo:
        return
    rec = models.recognizer(a.fp_dir, a.device, a.beam_size, a.ctc_weight)
    peft_model, base_fingerprint, mixture, missing = None, None, None, []
    for system in SYSTEMS[: SYSTEMS.index(todo[-1]) + 1]:  # one model object: fp, made NF4, then adapters on it
        if system == "nf4":
            base_fingerprint = to_nf4(rec.model, a.nf4_dir, device=a.device)
        elif system == "nf4_sat":
            peft_model = load_adapter(rec.model, a.sat_dir, base_fingerprint, name="sat")
        elif system == "saml":
            mixture = Mixture(peft_model, a.saml_dir, base_fingerprint)
        for part in (part for part in parts if system in part.todo):
            info: dict = {"system": system, "speaker": None if part.tag == "all" else part.tag,
                          "run_key": part.keys[system]}
            if system in ADAPTED:
                use = adapted(peft_model, system, a.adapter_dir / system / part.tag, a.sat_dir, base_fingerprint, info,
                              mixture)
            elif system == "nf4_sat":
                use = active(peft_model, "sat", a.sat_dir)
            elif system == "saml":
                use = mixed(mixture)
            else:
                use = contextlib.nullcontext(adapter_window(None))  # the base model decodes as it was trained
            with use as window:
                if window is None:
                    missing.append(f"{system}/{part.tag}")
                    write_hyps(a.out / system / part.tag, None, info)
                    continue
                start = time.time()
                rec.set_window(window)
                info["window"] = window
                routed = system == "saml" or info.get("fallback") == "saml"
                rows = mixture.route(rec, models, part.cuts) if routed else None
                with biased(rec, info.get("token_bias")):
                    hyps = rec.transcribe(part.cuts, desc=f"{system}/{part.tag}",
                                          tokens_per_second=a.max_tokens_per_second, adapters=rows)
                if rows:
                    info["mean_weights"] = {n: round(sum(r[n] for r in rows) / len(rows), 3) for n in mixture.names}
            info["seconds"] = round(time.time() - start, 2)
            info["utterances"] = len(hyps)
            write_hyps(a.out / system / part.tag, hyps, info)
            logging.info(f"{system}/{part.tag}: decoded {len(hyps)} utterances in {info['seconds']} s")
    if missing:
        raise MissingInput(f"no adapter for {', '.join(missing)} (rerun stage 7 for them, then stage 8; "
                           "or score as is with --stage 9: a speaker is marked as missing for these systems)")


@contextlib.contextmanager
def active(peft_model, name: str, adapter: Path) -> Iterator[str]:
    """Decode with the loaded adapter ``name`` (from the folder ``adapter``); yields its input window."""
    peft_model.set_adapter(name)
    yield adapter_window(adapter)


@contextlib.contextmanager
def mixed(mixture: Mixture) -> Iterator[str]:
    """Decode with every expert of ``mixture`` active (the rows' routing weights weigh them); yields their window."""
    mixture.activate()
    yield mixture.window


@contextlib.contextmanager
def adapted(peft_model, system: str, adapter: Path, sat_dir: Path, base_fingerprint: str, info: dict,
            mixture: Mixture | None) -> Iterator[str | None]:
    """Decode with a speaker's adapter of a per-speaker ``system``, loaded for this speaker only; its
    fallback where stage 7 made none on purpose (said in ``info``); yields the input window, or None (and
    ``info["missing"]``) where stage 7 failed or did not run for the speaker."""
    tag = adapter.name
    if (adapter / "fallback.json").exists():  # no adaptation data, or adapting did harm on held-out speech
        fallback = ADAPTED[system].fallback
        reason = read_json(adapter / "fallback.json").get("reason", "")
        logging.warning(f"{system}/{tag}: decoding with {fallback} instead ({reason})")
        info["fallback"] = fallback
        if fallback == "nf4_sat":
            with active(peft_model, "sat", sat_dir) as window:
                yield window
        elif fallback == "saml":  # the caller routes the utterances
            with mixed(mixture) as window:
                yield window
        else:
            with peft_model.disable_adapter():
                yield adapter_window(None)
    elif not (adapter / "adapter_model.safetensors").exists():  # its stage-7 job failed
        logging.error(f"{system}/{tag}: no adapter in {adapter}: stage 7 failed or did not run for {tag}; "
                      "marked as missing, not decoded with another system")
        info["missing"] = f"no adapter in {adapter} (stage 7)"
        yield None
    else:
        load_adapter(peft_model, adapter, base_fingerprint, name=system)
        bias = decode_token_bias(adapter)
        if bias:
            info["token_bias"] = bias
        try:
            with active(peft_model, system, adapter) as window:
                yield window
        finally:
            peft_model.set_adapter("sat")
            peft_model.delete_adapter(system)


if __name__ == "__main__":
    cli(main)

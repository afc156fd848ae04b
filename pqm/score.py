"""Stage 9: score every system with jiwer, overall and per speaker.

Writes ``results.json``, ``RESULTS.md`` (a markdown table to paste into a
paper, as ESPnet recipes do) and ``wer_per_speaker.png`` into the experiment
folder, and prints the table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable

import jiwer
from lhotse import CutSet

from pqm.errors import BadInput, cli, require, setup_logging
from pqm.families import FAMILIES, family, made_on
from pqm.files import atomic_path, read_json, write_json, write_text
from pqm.kaldi_table import read_table
from pqm.recipes import split_digits
from pqm.systems import DEFAULT_SYSTEMS, SYSTEMS


def count_errors(refs: list[str], hyps: list[str]) -> dict:
    """Word errors (substitutions + deletions + insertions) and reference words, with jiwer."""
    out = jiwer.process_words(refs, hyps)
    errors = out.substitutions + out.deletions + out.insertions
    words = out.substitutions + out.deletions + out.hits
    return {"wer": round(100 * errors / words, 2), "errors": errors, "words": words}


def score(decode_dir: Path, refs: dict[str, str], speakers: dict[str, str],
          normalise: Callable[[str], str] = lambda t: t) -> dict:
    """Score each system's hypotheses against ``refs``; per speaker and overall.

    ``normalise`` is applied to references and hypotheses alike (Whisper's
    English normaliser for Whisper models: each family's ``text_normaliser``).

    A speaker that a system could not decode (its adapter is missing) is listed
    under ``missing`` and left out of that system's overall WER, never filled in
    from another system.
    """
    systems = {}
    for system in SYSTEMS:
        if system not in DEFAULT_SYSTEMS and not (decode_dir / system).is_dir():
            continue  # an optional system (pqm_unsup) this run did not have
        per_speaker, all_refs, all_hyps, fallbacks, missing = {}, [], [], {}, {}
        for spk in sorted(set(speakers.values())):
            spk_dir = decode_dir / system / spk
            info = read_json(spk_dir / "info.json", "stage 8 (decoding)")
            if "missing" in info:
                per_speaker[spk] = {"missing": info["missing"]}
                missing[spk] = info["missing"]
                continue
            require(spk_dir / "text", "stage 8 (decoding)")
            hyps = read_table(spk_dir / "text", "rerun stage 8")
            utts = sorted(u for u, s in speakers.items() if s == spk)
            lacking = [u for u in utts if u not in hyps]
            if lacking:
                raise BadInput(f"{spk_dir}/text lacks {len(lacking)} utterances (e.g. {lacking[0]}): rerun stage 8")
            r, h = [normalise(refs[u]) for u in utts], [normalise(hyps[u]) for u in utts]
            empty = [u for u, text in zip(utts, r) if not text.strip()]
            if empty:
                raise BadInput(f"the transcript of {empty[0]} normalises to nothing ({refs[empty[0]]!r}): "
                               "fix or drop it in the corpus")
            per_speaker[spk] = count_errors(r, h)
            if info.get("fallback"):
                per_speaker[spk]["fallback"] = info["fallback"]
                fallbacks[spk] = info["fallback"]
            all_refs += r
            all_hyps += h
        overall = count_errors(all_refs, all_hyps) if all_refs else {"wer": None, "errors": 0, "words": 0}
        systems[system] = {**overall, "per_speaker": per_speaker}
        if fallbacks:
            systems[system]["fallbacks"] = fallbacks
        if missing:  # scored on the other speakers only, and said so
            systems[system]["missing"] = missing
    return systems


def add_per_set(systems: dict, test_sets: dict[str, list[str]]) -> None:
    """Add each system's WER per test set (e.g. LibriSpeech test-clean, test-other) from its per-speaker counts."""
    for r in systems.values():
        r["per_set"] = {}
        for name, spks in test_sets.items():
            counts = [r["per_speaker"][s] for s in spks if "wer" in r["per_speaker"].get(s, {})]
            errors, words = sum(c["errors"] for c in counts), sum(c["words"] for c in counts)
            r["per_set"][name] = {"wer": round(100 * errors / words, 2) if words else None, "errors": errors, "words": words}


def _relative(wer: float, base: float | None) -> str:
    """Relative WER change in percent, or n/a where the base is 0 or absent."""
    return f"{100 * (wer - base) / base:+.1f}" if base else "n/a"


def no_worse_than_fp(systems: dict, name: str) -> tuple[int, int]:
    """(speakers for whom ``name`` makes no more errors than ``fp``, speakers scored for both)."""
    fp, r = systems["fp"]["per_speaker"], systems[name]["per_speaker"]
    both = [s for s in r if "errors" in r[s] and "errors" in fp.get(s, {})]
    return sum(r[s]["errors"] <= fp[s]["errors"] for s in both), len(both)


def nf4_by_kind(breakdown: dict[str, int] | None) -> dict:
    """Stage 5's breakdown of the NF4 file (``size.json``) summed by kind: 4-bit weights, quantisation
    state, full-precision tensors, file header (empty for a ``size.json`` without one)."""
    if not breakdown:
        return {}
    kinds: dict[str, int] = {}
    for what, n in breakdown.items():
        kind = "full precision" if what.startswith("full precision") else what.split(" (")[0]
        kinds[kind] = kinds.get(kind, 0) + n
    return {"nf4_by_kind": kinds}


def saml_size(saml_dir: Path, systems: dict) -> tuple[dict, int]:
    """Where ``saml`` was decoded: its experts and router parameters, and their bytes on disk (stage 6's
    ``router.json``); else ``({}, 0)``."""
    if "saml" not in systems:
        return {}, 0
    router = read_json(saml_dir / "router.json", "stage 6 with --saml-experts")
    return {"experts": len(router["experts"]), "router_params": router["router_params"]}, router["bytes"]


def markdown(results: dict) -> str:
    """The results as ESPnet-style markdown tables: systems, then speakers (rows) by system (columns)."""
    systems = results["systems"]
    speakers = results["test_speakers"]
    fp_wer, nf4_wer = systems["fp"]["wer"], systems["nf4"]["wer"]
    size = results["size_bytes"]
    params = results["params"]
    lines = [
        f"# RESULTS: {results['corpus']}, {results['model']}",
        "",
        f"- {len(speakers)} test speakers (unseen in training), scored on their evaluation parts",
        f"- model size on disk: fp32 {size['fp32']:,} bytes, NF4 {size['nf4']:,} bytes "
        f"({size['fp32'] / size['nf4']:.2f}x smaller)",
        f"- parameters: base {params['base']:,}; LoRA per speaker {params['lora_per_speaker']:,} "
        f"({100 * params['lora_per_speaker'] / params['base']:.2f}% of the base)",
        *(["- the NF4 file by kind: " + ", ".join(f"{what} {n:,} bytes ({100 * n / size['nf4']:.1f}%)"
                                                  for what, n in size["nf4_by_kind"].items())] if "nf4_by_kind" in size else []),
        *([f"- one speaker's adapter file: {size['adapter']:,} bytes ({100 * size['adapter'] / size['nf4']:.2f}% of the "
           "NF4 file)"] if "adapter" in size else []),
        *([f"- `saml`: {saml['experts']} LoRA experts and a router of {saml['router_params']:,} parameters, "
           f"{size['saml']:,} bytes on disk ({100 * size['saml'] / size['nf4']:.2f}% of the NF4 file)"]
          if (saml := results.get("saml")) else []),
        *([f"- one speaker's `saml_sa` adapter file (the experts merged: their ranks added up): {size['saml_sa_adapter']:,} "
           f"bytes ({100 * size['saml_sa_adapter'] / size['nf4']:.2f}% of the NF4 file)"] if "saml_sa_adapter" in size else []),
        *([f"- adaptation speech per test speaker: {adaptation['utterances_per_speaker'] or 'all'} utterance"
           f"{'' if adaptation['utterances_per_speaker'] == 1 else 's'}, "
           f"{adaptation['minutes_per_speaker']:.2f} minutes on average"
           + (f", the last {held} of them held out to judge the transcribed adapters"
              if (held := adaptation.get("held_out_per_speaker")) else "")] if (adaptation := results.get("adaptation")) else []),
        *([f"- the fp model was made (trained, or converted from --pretrained) on: {machine['cpu']}, "
           f"{machine['cores']} cores, torch {machine['torch']}"] if (machine := results.get("fp_made_on")) else []),
        "",
        "| system | WER (%) | errors | words | rel. vs fp (%) | rel. vs nf4 (%) | speakers no worse than fp |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in systems.items():
        if r["wer"] is None:  # every speaker missing
            lines.append(f"| {name} | n/a | 0 | 0 | | | |")
            continue
        kept, scored = no_worse_than_fp(systems, name)
        lines.append(f"| {name} | {r['wer']:.2f} | {r['errors']} | {r['words']} | {_relative(r['wer'], fp_wer)} | "
                     f"{_relative(r['wer'], nf4_wer)} | {kept}/{scored} |")
    lines += ["", "| speaker | " + " | ".join(f"{n} WER (%)" for n in systems) + " |",
              "|---|" + "---:|" * len(systems)]
    for spk in speakers:
        cells = []
        for r in systems.values():
            ps = r["per_speaker"][spk]
            if "missing" in ps:
                cells.append("missing (no adapter)")
            else:
                cells.append(f"{ps['wer']:.2f}" + (f" (fallback: {ps['fallback']})" if "fallback" in ps else ""))
        lines.append(f"| {spk} | " + " | ".join(cells) + " |")
    fallbacks = {n: r["fallbacks"] for n, r in systems.items() if r.get("fallbacks")}
    for name, spks in fallbacks.items():
        lines.append(f"\n**{name}** fell back to {', '.join(sorted(set(spks.values())))} for {len(spks)} of "
                     f"{len(speakers)} speakers (no adaptation data, or adapting did not help on held-out speech: "
                     "see the speaker's fallback.json).")
    if results.get("test_sets"):
        names = list(results["test_sets"])
        lines += ["", "| system | " + " | ".join(f"{n} WER (%)" for n in names) + " |", "|---|" + "---:|" * len(names)]
        for name, r in systems.items():
            lines.append(f"| {name} | " + " | ".join(
                "n/a" if r["per_set"][n]["wer"] is None else f"{r['per_set'][n]['wer']:.2f}" for n in names) + " |")
    incomplete = {n: r["missing"] for n, r in systems.items() if r.get("missing")}
    for name, missing in incomplete.items():
        lines.append(f"\n**{name}** is scored without speaker(s) {', '.join(sorted(missing))}: no adapter "
                     "(their stage-7 jobs failed); its WER covers the other speakers only.")
    if results.get("stage_seconds"):
        lines += ["", "| stage | " + " | ".join(results["stage_seconds"]) + " |",
                  "|---|" + "---:|" * len(results["stage_seconds"]),
                  "| seconds | " + " | ".join(f"{v:.0f}" for v in results["stage_seconds"].values()) + " |"]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Bar chart of WER per speaker per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speakers = results["test_speakers"] + ["all"]
    systems = list(results["systems"])
    width = 0.8 / len(systems)
    fig, ax = plt.subplots(figsize=(min(1.6 * len(speakers) + 3, 24), 4))
    for i, name in enumerate(systems):
        r = results["systems"][name]
        values = [r["per_speaker"][s].get("wer", float("nan")) for s in results["test_speakers"]]
        values.append(float("nan") if r["wer"] is None else r["wer"])
        xs = [j + (i - (len(systems) - 1) / 2) * width for j in range(len(speakers))]
        ax.bar(xs, values, width, label=name)
    ax.set_xticks(range(len(speakers)), speakers, rotation=90 if len(speakers) > 8 else 0)
    ax.set_ylabel("WER (%)")
    ax.set_title(f"{results['corpus']} / {results['model']}: WER per test speaker")
    ax.legend(ncols=len(systems), fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def adaptation_speech(cuts: CutSet, utts: int, holdout: int = 0) -> dict:
    """How much adaptation speech each test speaker had: the first ``utts`` (0: all) of the speaker's
    adaptation cuts, in manifest order, as stage 7 takes them (``--sa-utts``), ``holdout`` of them held out
    to judge the transcribed adapters (``--sa-holdout``)."""
    durations: dict[str, list[float]] = {}
    for cut in cuts:
        durations.setdefault(cut.supervisions[0].speaker, []).append(cut.duration)
    used = [sum(d[:utts] if utts else d) for d in durations.values()]
    return {"utterances_per_speaker": utts or None, "held_out_per_speaker": holdout,
            "minutes_per_speaker": round(sum(used) / max(len(used), 1) / 60, 3)}


def stage_seconds(expdir: Path, started: float) -> dict[str, float]:
    """Wall time per stage as recorded by run.sh in ``<expdir>/timing/stage<N>.seconds``; stage 9 (this
    one, still running) from ``started``, the time scoring began (the interpreter's start-up not counted)."""
    out = {}
    for n in range(1, 9):
        f = expdir / "timing" / f"stage{n}.seconds"
        if f.exists():
            out[str(n)] = float(f.read_text().strip())
    out["9"] = round(time.time() - started, 1)
    return out


def main(argv: list[str] | None = None) -> None:
    started = time.time()
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--expdir", type=Path, required=True)
    p.add_argument("--cuts", type=Path, required=True, help="evaluation cuts (references)")
    p.add_argument("--corpus", default="fsdd")
    p.add_argument("--model", default="conformer", choices=FAMILIES)
    p.add_argument("--adapt-cuts", type=Path, default=None, help="adaptation cuts (the speech each speaker had)")
    p.add_argument("--adapt-utts", type=int, default=0, help="stage 7's --sa-utts: the first N of each speaker's")
    p.add_argument("--adapt-holdout", type=int, default=0, help="stage 7's --sa-holdout: of those, held out")
    a = p.parse_args(argv)
    setup_logging()
    cuts = CutSet.from_file(require(a.cuts, "stage 2 (manifests)"))
    refs = {c.id: c.supervisions[0].text for c in cuts}
    speakers = {c.id: c.supervisions[0].speaker for c in cuts}
    size = read_json(a.expdir / "nf4" / "size.json", "stage 5 (NF4 quantisation)")
    adapters = [f for f in [*(a.expdir / "adapters" / "pqm").glob("*/adapter_model.safetensors"),
                            a.expdir / "sat" / "adapter_model.safetensors"] if f.exists()]
    merged = list((a.expdir / "adapters" / "saml_sa").glob("*/adapter_model.safetensors"))
    lora = [
        read_json(f)["lora_params"] for f in sorted((a.expdir / "adapters" / "pqm").glob("*/pqm_adapter.json"))
    ] or [read_json(a.expdir / "sat" / "pqm_adapter.json", "stage 6 (SAT)")["lora_params"]]
    test_sets = read_json(a.cuts.parent / "speakers.json", "stage 2 (manifests)").get("test_sets")
    digits = split_digits(a.cuts.parent)
    systems = score(require(a.expdir / "decode", "stage 8 (decoding)"), refs, speakers, family(a.model).text_normaliser(a.expdir / "fp", digits))
    if test_sets:
        add_per_set(systems, test_sets)
    saml, saml_bytes = saml_size(a.expdir / "saml", systems)
    results = {
        "corpus": a.corpus,
        "model": a.model,
        "scoring": {"split_digits": digits},
        "test_speakers": sorted(set(speakers.values())),
        "systems": systems,
        **({"test_sets": test_sets} if test_sets else {}),
        "size_bytes": {**size["size_bytes"], **nf4_by_kind(size.get("breakdown_bytes")),
                       **({"adapter": max(f.stat().st_size for f in adapters)} if adapters else {}),
                       **({"saml": saml_bytes} if saml else {}),
                       **({"saml_sa_adapter": max(f.stat().st_size for f in merged)} if merged else {})},
        "params": {"base": size["params"], "lora_per_speaker": max(lora)},
        **({"saml": saml} if saml else {}),
        **({"adaptation": adaptation_speech(CutSet.from_file(a.adapt_cuts), a.adapt_utts, a.adapt_holdout)}
           if a.adapt_cuts and a.adapt_cuts.exists() else {}),
        "stage_seconds": stage_seconds(a.expdir, started),
        **({"fp_made_on": machine} if (machine := made_on(a.expdir / "fp")) else {}),
    }
    write_json(a.expdir / "results.json", results)
    table = markdown(results)
    write_text(a.expdir / "RESULTS.md", table)
    plot(results, a.expdir / "wer_per_speaker.png")
    print(table)
    for name in ("results.json", "RESULTS.md", "wer_per_speaker.png"):
        print(f"wrote {a.expdir / name}")


if __name__ == "__main__":
    cli(main)

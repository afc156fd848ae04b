#!/usr/bin/env python3
"""Decoding speed, memory and WER of a Whisper recipe's models against faster-whisper (CTranslate2).

    pip install -r tools/requirements-benchmark.txt      # faster-whisper: only for this benchmark
    python local/benchmark_decode.py --expdir exp/speechocean762_whisper \\
        --cuts data/speechocean762/manifests/speechocean762_cuts_eval.jsonl.gz --max-utts 40

Configurations, each decoding the same clips one at a time (batch 1, as a user
transcribing files), English, no timestamps, at most 128 new tokens, with
openai-whisper's temperature fallback (``pqm.families.whisper.DECODING``; the
same thresholds are given to faster-whisper):

- ``fp``: transformers, float32 (the recipe's ``fp/``), 30 s input window;
- ``nf4``: the recipe's NF4 base (bitsandbytes), 30 s window;
- ``nf4_lora``: NF4 + each clip's speaker's ``pqm`` adapter, unmerged (peft),
  in the window the adapter was trained in (the speaker's SAT adapter where
  stage 7 kept none, as ``pqm.transcribe`` does);
- ``ct2_int8``, ``ct2_fp32``: faster-whisper on the same ``fp/`` folder
  converted with CTranslate2's own converter (``ct2-transformers-converter``,
  ``--quantization int8`` / ``float32``), 30 s window (faster-whisper pads so).

With ``--batch-sizes 8`` the clips are also decoded 8 at a time (as a service
or a batch job would): the recipe's models through ``Transcriber.transcribe_mixed``
(each clip with its own speaker's adapter, one batch), CTranslate2 through
``generate`` on the batch's features, which faster-whisper's own
``transcribe`` cannot batch across files (its feature extractor, tokenizer,
30 s padding and token limit). At a batch size over 1 both sides decode at
temperature 0 only: faster-whisper's fallback lives in its per-file
``transcribe``.

The clips are spread over the speakers (``--max-utts``: each speaker's first
clip by id, then each one's second, ...). Each configuration runs in its own
process, for every ``--threads``, ``--beams`` and ``--batch-sizes``: real-time factor (decoding
seconds / audio seconds, after one warm-up clip; model loading and, for
``nf4_lora``, loading every speaker's adapter beforehand are reported apart)
and the peak resident memory of the process. faster-whisper's process never imports
torch: the parent writes the audio to a ``.npz`` it reads. WER is scored as
stage 9 scores (the family's normaliser and the corpus's digit rule, jiwer)
so that speed is never shown without the accuracy it came with. Output: a
table on stdout, ``<out>/benchmark.md`` and ``benchmark.json`` (``--out``,
default ``<expdir>/benchmark_decode``). CPU only: GPU runs are not
implemented.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = ("fp", "nf4", "nf4_lora", "ct2_int8", "ct2_fp32")
CT2_QUANTISATION = {"ct2_int8": "int8", "ct2_fp32": "float32"}
MAX_NEW_TOKENS = 128


def select_cuts(path: Path, max_utts: int):
    """``max_utts`` utterances of the manifest (0: all), spread over its speakers: each speaker's first
    utterance by id, then each one's second, and so on."""
    from lhotse import CutSet

    by_speaker: dict[str, list] = {}
    for cut in sorted(CutSet.from_file(path), key=lambda c: c.id):
        by_speaker.setdefault(cut.supervisions[0].speaker, []).append(cut)
    turns = [cuts[i] for i in range(max(map(len, by_speaker.values()))) for _, cuts in sorted(by_speaker.items())
             if i < len(cuts)]
    return turns[:max_utts] if max_utts else turns


def write_audio(cuts, path: Path) -> None:
    """16 kHz float32 samples of every clip, for the faster-whisper process (which must not import lhotse)."""
    import numpy as np

    np.savez(path, **{c.id: c.resample(16000).load_audio()[0].astype(np.float32) for c in cuts})


def convert(fp_dir: Path, out: Path, quantisation: str) -> Path:
    """The recipe's ``fp/`` Whisper folder in CTranslate2's format (once)."""
    if (out / "model.bin").exists():
        return out
    converter = shutil.which("ct2-transformers-converter") or str(Path(sys.executable).parent / "ct2-transformers-converter")
    if not Path(converter).exists():
        raise SystemExit("ct2-transformers-converter not found: pip install -r tools/requirements-benchmark.txt")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    extra = [f for f in ("tokenizer.json", "preprocessor_config.json") if (fp_dir / f).exists()]
    subprocess.run([converter, "--model", str(fp_dir), "--output_dir", str(tmp), "--quantization", quantisation,
                    "--copy_files", *extra], check=True)
    tmp.rename(out)
    return out


def child_pqm(spec: dict) -> dict:
    """Decode with the recipe's models (fp, nf4 or nf4 + each speaker's adapter) in this process."""
    import torch

    from lhotse import CutSet

    from pqm.transcribe import Transcriber

    torch.set_num_threads(spec["threads"])
    from pqm.families import whisper

    whisper.DECODING = {**whisper.DECODING, "temperature": spec["temperature"]}
    start = time.perf_counter()
    cuts = list(CutSet.from_file(spec["cuts"]).subset(cut_ids=spec["ids"]))
    cuts.sort(key=lambda c: spec["ids"].index(c.id))
    speakers = sorted({c.supervisions[0].speaker for c in cuts})
    model = Transcriber(Path(spec["expdir"]), beam_size=spec["beam"], quantise=spec["config"] != "fp",
                        cache=len(speakers))
    model.rec.batch_size = spec["batch"]
    load = time.perf_counter() - start
    adapters = {s: model.adapter_of(s)[0] if spec["config"] == "nf4_lora" else None for s in speakers}
    start = time.perf_counter()
    for adapter in {a for a in adapters.values() if a is not None}:  # not timed as decoding: reported apart
        model.preload(adapter)
    load_adapters = time.perf_counter() - start

    def adapter(cut):
        return adapters[cut.supervisions[0].speaker]

    model.transcribe([cuts[0]], adapter(cuts[0]))  # warm-up, not timed
    hyps, start, n = {}, time.perf_counter(), spec["batch"]
    for i in range(0, len(cuts), n):
        batch = cuts[i : i + n]
        hyps.update(model.transcribe(batch, adapter(batch[0])) if n == 1 else
                    model.transcribe_mixed(batch, [adapter(c) for c in batch]))
    from pqm.lora import adapter_window

    window = ", ".join(sorted({adapter_window(a) for a in adapters.values() if a is not None})) or "padded"
    return {"load_s": load, "adapters_s": load_adapters, "decode_s": time.perf_counter() - start, "hyps": hyps,
            "window": window}


def child_ct2(spec: dict) -> dict:
    """Decode with faster-whisper in this process (numpy audio; no torch, no lhotse)."""
    import numpy as np
    from faster_whisper import WhisperModel

    start = time.perf_counter()
    model = WhisperModel(spec["ct2_dir"], device="cpu", compute_type=CT2_QUANTISATION[spec["config"]],
                         cpu_threads=spec["threads"], num_workers=1)
    load = time.perf_counter() - start
    audio = np.load(spec["audio"])
    options = dict(language="en", beam_size=spec["beam"], without_timestamps=True, condition_on_previous_text=False,
                   vad_filter=False, temperature=spec["temperature"], compression_ratio_threshold=spec["compression"],
                   log_prob_threshold=spec["logprob"], no_speech_threshold=None, max_new_tokens=MAX_NEW_TOKENS)

    def run(utt: str) -> str:
        segments, _ = model.transcribe(audio[utt], **options)
        return " ".join(" ".join(s.text for s in segments).split())

    import ctranslate2
    from faster_whisper.audio import pad_or_trim
    from faster_whisper.tokenizer import Tokenizer

    tokenizer = Tokenizer(model.hf_tokenizer, model.model.is_multilingual, task="transcribe", language="en")
    prompt = [*tokenizer.sot_sequence, tokenizer.no_timestamps]

    def run_batch(utts: list[str]) -> list[str]:
        """One ``generate`` call on the clips' 30 s features (as faster-whisper's transcribe pads them)."""
        feats = np.stack([pad_or_trim(model.feature_extractor(audio[u])[:, :3000]) for u in utts])
        results = model.model.generate(ctranslate2.StorageView.from_array(np.ascontiguousarray(feats)),
                                       [prompt] * len(utts), beam_size=spec["beam"],
                                       max_length=len(prompt) + MAX_NEW_TOKENS, suppress_blank=True, suppress_tokens=[-1])
        return [" ".join(tokenizer.decode(r.sequences_ids[0]).split()) for r in results]

    n = spec["batch"]
    run(spec["ids"][0]) if n == 1 else run_batch(spec["ids"][:1])  # warm-up, not timed
    hyps, start = {}, time.perf_counter()
    for i in range(0, len(spec["ids"]), n):
        utts = spec["ids"][i : i + n]
        hyps.update({utts[0]: run(utts[0])} if n == 1 else dict(zip(utts, run_batch(utts))))
    return {"load_s": load, "decode_s": time.perf_counter() - start, "hyps": hyps}


def child(spec_json: str) -> None:
    spec = json.loads(spec_json)
    out = child_ct2(spec) if spec["config"].startswith("ct2") else child_pqm(spec)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))


def run_config(spec: dict, log: Path) -> dict:
    """One configuration in a fresh process with ``spec['threads']`` threads; its log goes to ``log``."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=f)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{spec['config']} (threads {spec['threads']}, beam {spec['beam']}) failed: see {log}")
    return json.loads(lines[-1][len("RESULT "):])


def markdown(rows: list[dict]) -> str:
    head = ("| clips | config | threads | beam | batch | window | RTF | x fp speed | peak MB | load s | adapters s "
            "| WER (%) | errors | words |\n|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    fp = {(r["set"], r["threads"], r["beam"], r["batch"]): r["rtf"] for r in rows if r["config"] == "fp"}
    lines = []
    for r in rows:
        base = fp.get((r["set"], r["threads"], r["beam"], r["batch"]))
        speed = f"{base / r['rtf']:.2f}" if base else "-"
        lines.append(f"| {r['set']} | {r['config']} | {r['threads']} | {r['beam']} | {r['batch']} | {r['window']} | "
                     f"{r['rtf']:.3f} | "
                     f"{speed} | {r['peak_rss_mb']:.0f} | {r['load_s']:.1f} | {r['adapters_s']:.1f} | {r['wer']:.2f} | "
                     f"{r['errors']} | {r['words']} |")
    return head + "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--expdir", type=Path, required=True, help="a Whisper recipe's experiment folder (stages 4-7 done)")
    p.add_argument("--cuts", type=Path, nargs="+", required=True, help="evaluation manifests (stage 2's *_cuts_eval)")
    p.add_argument("--max-utts", type=int, default=40, help="clips per manifest, speaker by speaker (0: all)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--beams", type=int, nargs="+", default=[1, 4])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1],
                   help="clips decoded at a time (over 1: temperature 0 only, on both sides)")
    p.add_argument("--out", type=Path, default=None, help="default: <expdir>/benchmark_decode")
    a = p.parse_args()

    from pqm.families import family, family_of
    from pqm.families.whisper import DECODING
    from pqm.recipes import split_digits
    from pqm.score import count_errors

    fp_dir = a.expdir / "fp"
    if family_of(fp_dir) != "whisper":
        raise SystemExit(f"{fp_dir}: a Whisper model is needed (faster-whisper runs Whisper only)")
    if any(c.startswith("ct2") for c in a.configs) and importlib.util.find_spec("faster_whisper") is None:
        raise SystemExit("faster-whisper is not installed: pip install -r tools/requirements-benchmark.txt")
    out = a.out or a.expdir / "benchmark_decode"
    (out / "log").mkdir(parents=True, exist_ok=True)
    ct2 = {c: convert(fp_dir, out / f"ct2_{q}", q) for c, q in CT2_QUANTISATION.items() if c in a.configs}
    rows = []
    for cuts_path in a.cuts:
        cuts = select_cuts(cuts_path, a.max_utts)
        name = cuts_path.name.split("_cuts_")[0]
        audio = out / f"{name}.npz"
        write_audio(cuts, audio)
        ids = [c.id for c in cuts]
        refs = [c.supervisions[0].text for c in cuts]
        seconds = sum(c.duration for c in cuts)
        normalise = family(fp_dir).text_normaliser(fp_dir, split_digits(cuts_path.parent))
        speakers = {c.supervisions[0].speaker for c in cuts}
        print(f"{name}: {len(cuts)} clips, {seconds:.1f} s of audio, {len(speakers)} speakers", flush=True)
        for config, threads, beam, batch in itertools.product(a.configs, a.threads, a.beams, a.batch_sizes):
            spec = {"config": config, "threads": threads, "beam": beam, "batch": batch, "expdir": str(a.expdir),
                    "cuts": str(cuts_path), "ids": ids, "audio": str(audio), "ct2_dir": str(ct2.get(config)),
                    "temperature": DECODING["temperature"] if batch == 1 else [0.0],
                    "compression": DECODING["compression_ratio_threshold"],
                    "logprob": DECODING["logprob_threshold"]}
            r = run_config(spec, out / "log" / f"{name}.{config}.t{threads}.b{beam}.n{batch}.log")
            hyps = [r["hyps"][i] for i in ids]
            counted = count_errors([normalise(t) for t in refs], [normalise(h) for h in hyps])
            counted["wer"] = 100 * counted["errors"] / counted["words"]  # unrounded: the table rounds
            row = {"set": name, "config": config, "threads": threads, "beam": beam, "batch": batch,
                   "window": r.get("window", "padded"), "clips": len(ids), "audio_s": round(seconds, 2),
                   "rtf": r["decode_s"] / seconds, "load_s": r["load_s"], "adapters_s": r.get("adapters_s", 0.0),
                   "peak_rss_mb": r["peak_rss_mb"],
                   **counted, "hyps": r["hyps"]}
            rows.append(row)
            print(f"  {config:9s} threads {threads} beam {beam} batch {batch}: RTF {row['rtf']:.3f}, peak "
                  f"{row['peak_rss_mb']:.0f} MB, WER {row['wer']:.2f}%", flush=True)
    table = markdown(rows)
    (out / "benchmark.md").write_text(table)
    (out / "benchmark.json").write_text(json.dumps(rows, indent=1))
    print("\n" + table + f"\n(written to {out}/benchmark.md and benchmark.json)")


if __name__ == "__main__":
    child(sys.argv[2]) if sys.argv[1:2] == ["--child"] else main()

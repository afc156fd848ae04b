#!/usr/bin/env python3
"""Load test of ``pqm.serve``: throughput, latency and memory with 1, 4, 16 and 64 distinct speakers.

    python local/benchmark_serve.py --expdir exp/speechocean762_whisper \\
        --cuts data/speechocean762/manifests/speechocean762_cuts_eval.jsonl.gz --requests 64 --concurrency 4

For each number of distinct speakers, a real server (``python -m pqm.serve``,
its own process, a free local port) gets a fixed number of POST /transcribe
requests, ``--concurrency`` in flight at once, speakers taken in turn. Each
request sends one evaluation clip of the speaker whose adapter it names.
Printed per run: throughput (audio seconds transcribed per wall second),
p50/p95 latency, the server's resident memory with the base alone (after
/health) and at the end (peak), and the memory per loaded adapter ((end -
base) / adapters in memory: an upper bound, since it includes what decoding
itself allocates). More speakers than the experiment has adapters
are made by copying real adapters under new names (``bench-NN``: the
same weights, separate files, so that the server loads each), in a scratch
copy of the experiment folder whose models are links to the original.

Each speaker count runs twice: requests decoded one at a time
(``--batch-window-ms 0``), and requests that arrive within the batching window
decoded together in mixed-speaker batches (each row through its own adapter);
the table gives both, the mean batch size, and how many answers of the batched
run equal the one-at-a-time run's answer to the same request. Output: the
table, and ``<out>/benchmark_serve.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import soundfile
from aiohttp import ClientSession, FormData
from lhotse import CutSet


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> dict[str, float]:
    """Resident memory now and at its peak (VmRSS, VmHWM) of a process, in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[name].split()[0]) / 1024 for k, name in (("now", "VmRSS"), ("peak", "VmHWM"))}


def wav_bytes(cut) -> bytes:
    """The clip as a WAV file's bytes, as a client would upload it."""
    buffer = io.BytesIO()
    soundfile.write(buffer, cut.load_audio()[0], cut.sampling_rate, format="WAV")
    return buffer.getvalue()


def scratch_expdir(expdir: Path, tmp: Path, speakers: list[str], n: int) -> list[tuple[str, str]]:
    """An experiment folder in ``tmp`` with ``n`` speakers' adapters: (name served, real speaker whose clips
    and adapter it uses). Models are links; adapters beyond the real ones are copies under new names."""
    for name in ("fp", "nf4", "sat"):
        (tmp / name).symlink_to((expdir / name).resolve())
    out = []
    for i in range(n):
        real = speakers[i % len(speakers)]
        name = real if i < len(speakers) else f"bench-{i:02d}"
        shutil.copytree(expdir / "adapters" / "pqm" / real, tmp / "adapters" / "pqm" / name)
        out.append((name, real))
    return out


async def load(port: int, jobs: list[tuple[str, bytes]], concurrency: int) -> tuple[list[float], list[dict]]:
    """Send every (speaker, audio) request, ``concurrency`` at a time; latencies in seconds, and the answers."""
    latencies: list[float] = []
    answers: list[dict] = [{} for _ in jobs]
    queue: asyncio.Queue = asyncio.Queue()
    for job in enumerate(jobs):
        queue.put_nowait(job)

    async def client(session: ClientSession) -> None:
        while not queue.empty():
            index, (speaker, audio) = queue.get_nowait()
            form = FormData()
            form.add_field("audio", audio, filename="clip.wav")
            form.add_field("speaker", speaker)
            start = time.perf_counter()
            async with session.post(f"http://127.0.0.1:{port}/transcribe", data=form) as reply:
                body = await reply.json()
                if reply.status != 200 or body["system"] != "pqm":
                    raise SystemExit(f"request for {speaker}: HTTP {reply.status}, {body}")
            latencies.append(time.perf_counter() - start)
            answers[index] = body

    async with ClientSession() as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return latencies, answers


def wait_healthy(port: int, server: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    async def ping() -> bool:
        try:
            async with ClientSession() as session, session.get(f"http://127.0.0.1:{port}/health") as reply:
                return reply.status == 200
        except OSError:
            return False

    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server stopped: see {log}")
        if asyncio.run(ping()):
            return
        time.sleep(0.5)
    raise SystemExit(f"the server did not answer /health in {timeout} s: see {log}")


def run_one(a: argparse.Namespace, clips: dict[str, list], n: int, window_ms: float, out: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="pqm-serve-bench-") as tmp:
        served = scratch_expdir(a.expdir, Path(tmp), sorted(clips), n)
        jobs, seconds = [], 0.0
        for i in range(a.requests):
            name, real = served[i % n]
            cut = clips[real][(i // n) % len(clips[real])]
            jobs.append((name, wav_bytes(cut)))
            seconds += cut.duration
        port, log = free_port(), out / f"server.{n}.{'batched' if window_ms else 'one'}.log"
        with open(log, "w") as f:
            server = subprocess.Popen([sys.executable, "-m", "pqm.serve", "--expdir", tmp, "--port", str(port),
                                       "--cache", str(a.cache), "--batch-window-ms", str(window_ms),
                                       "--batch-size", str(a.batch_size)], stdout=f, stderr=subprocess.STDOUT)
        try:
            wait_healthy(port, server, log)
            base = rss_mb(server.pid)["now"]
            start = time.perf_counter()
            latencies, answers = asyncio.run(load(port, jobs, a.concurrency))
            wall = time.perf_counter() - start
            memory = rss_mb(server.pid)
        finally:
            server.terminate()
            server.wait(timeout=120)
    loaded = min(n, a.cache)
    quantiles = statistics.quantiles(latencies, n=20)
    return {"speakers": n, "batch_window_ms": window_ms, "mean_batch": statistics.mean(x["batch"] for x in answers),
            "hypotheses": [x["hypothesis"] for x in answers],
            "requests": a.requests, "concurrency": a.concurrency, "audio_s": round(seconds, 2),
            "wall_s": round(wall, 2), "audio_s_per_s": seconds / wall, "p50_s": statistics.median(latencies),
            "p95_s": quantiles[18], "base_mb": base, "end_mb": memory["now"], "peak_mb": memory["peak"],
            "adapters_loaded": loaded, "mb_per_adapter": (memory["now"] - base) / loaded}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--expdir", type=Path, required=True, help="an experiment folder with stage 7's pqm adapters")
    p.add_argument("--cuts", type=Path, required=True, help="evaluation cuts of the adapted speakers")
    p.add_argument("--speakers", type=int, nargs="+", default=[1, 4, 16, 64], help="distinct speakers per run")
    p.add_argument("--requests", type=int, default=64, help="requests per run")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    p.add_argument("--batch-window-ms", type=float, default=20.0, help="the batched runs' window")
    p.add_argument("--batch-size", type=int, default=8, help="the batched runs' largest batch")
    p.add_argument("--cache", type=int, default=64, help="the server's --cache (adapters kept in memory)")
    p.add_argument("--out", type=Path, default=None, help="default: <expdir>/benchmark_serve")
    a = p.parse_args()
    adapted = {d.name for d in (a.expdir / "adapters" / "pqm").iterdir() if (d / "adapter_model.safetensors").exists()}
    clips: dict[str, list] = {}
    for cut in CutSet.from_file(a.cuts):
        if cut.supervisions[0].speaker in adapted:
            clips.setdefault(cut.supervisions[0].speaker, []).append(cut)
    if not clips:
        raise SystemExit(f"{a.cuts}: no clips of a speaker with an adapter in {a.expdir}/adapters/pqm")
    out = a.out or a.expdir / "benchmark_serve"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in a.speakers:
        for window_ms in (0.0, a.batch_window_ms):
            rows.append(run_one(a, clips, n, window_ms, out))
            r = rows[-1]
            r["same_as_one_at_a_time"] = sum(x == y for x, y in zip(r["hypotheses"], rows[-2]["hypotheses"])) \
                if window_ms else a.requests
            print(f"{n:3d} speakers, {'batched' if window_ms else 'one at a time'}: {r['audio_s_per_s']:.2f} audio s/s, "
                  f"p50 {r['p50_s']:.2f} s, p95 {r['p95_s']:.2f} s, mean batch {r['mean_batch']:.1f}, memory "
                  f"{r['base_mb']:.0f} MB base, {r['end_mb']:.0f} MB end ({r['mb_per_adapter']:.1f} MB per adapter, "
                  f"{r['adapters_loaded']} loaded)", flush=True)
    (out / "benchmark_serve.json").write_text(json.dumps(rows, indent=1))
    single = {r["batch_window_ms"]: r["audio_s_per_s"] for r in rows if r["speakers"] == min(a.speakers)}
    print("\n| speakers | batching | mean batch | audio s / s | vs 1 speaker | p50 s | p95 s | answers as one at a time "
          "| base MB | end MB | MB per adapter |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['speakers']} | {'mixed, ' + str(r['batch_window_ms']) + ' ms' if r['batch_window_ms'] else 'none'} | "
              f"{r['mean_batch']:.1f} | {r['audio_s_per_s']:.2f} | {r['audio_s_per_s'] / single[r['batch_window_ms']]:.0%} | "
              f"{r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['same_as_one_at_a_time']}/{r['requests']} | {r['base_mb']:.0f} | "
              f"{r['end_mb']:.0f} | {r['mb_per_adapter']:.1f} |")

if __name__ == "__main__":
    main()

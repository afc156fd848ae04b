"""An HTTP service: one NF4 base model in memory, each speaker's adapter loaded on demand.

    python -m pqm.serve --expdir exp/speechocean762_whisper --port 8000
    curl -F audio=@a.wav -F speaker=1031 http://localhost:8000/transcribe

Endpoints:

- ``POST /transcribe``: multipart form with ``audio`` (a file libsndfile reads)
  and optionally ``speaker``; returns JSON (speaker, system, hypothesis,
  seconds). A speaker without an adapter is served by the SAT adapter and the
  ``system`` field says so. Bad input gets a 4xx with the reason, and the
  server keeps serving: not audio or empty audio (400), audio longer than the
  model reads (413), a body over ``--max-mb`` (413), an unsafe speaker id (400).
- ``GET /speakers``: the speakers with an adapter on disk now (an adapter
  written while the server runs is used from the next request on, no restart)
  and the adapters loaded in memory (at most ``--cache``).
- ``GET /health``.

Built on aiohttp (asyncio, one process): decoding runs in one worker thread,
one request after another, so the event loop keeps accepting requests and
answers health checks meanwhile. Requests are not yet batched: batching across
speakers needs each utterance of a batch decoded with its own adapter, which
peft offers (``adapter_names``), but Whisper's temperature fallback decodes a
sub-batch again, which peft's per-utterance adapter list does not follow.
Adapter paths never come from request data: only a speaker id, checked to be a
safe file name, which names ``<expdir>/adapters/pqm/<speaker>``. SIGINT or
SIGTERM stops accepting requests and finishes those in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from aiohttp import web

from pqm.errors import BadInput, cli, setup_logging
from pqm.transcribe import Transcriber, audio_cut

TRANSCRIBER = web.AppKey("transcriber", Transcriber)
WORKER = web.AppKey("worker", ThreadPoolExecutor)


async def transcribe(request: web.Request) -> web.Response:
    fields: dict[str, bytes | str] = {}
    async for part in await request.multipart():
        fields[part.name or ""] = await part.read() if part.name == "audio" else await part.text()
    audio = fields.get("audio")
    if not audio:
        raise web.HTTPBadRequest(text="no audio: send a multipart form with an 'audio' file (and 'speaker')")
    speaker = str(fields["speaker"]) if fields.get("speaker") else None
    model = request.app[TRANSCRIBER]
    start = time.time()

    def work() -> dict:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "audio"
            path.write_bytes(audio)
            cut = audio_cut(path, "request")
            adapter, system = model.adapter_of(speaker)
            hypothesis = model.transcribe([cut], adapter)[cut.id]
        return {"speaker": speaker, "system": system, "hypothesis": hypothesis, "seconds": round(time.time() - start, 3)}

    try:
        result = await asyncio.get_running_loop().run_in_executor(request.app[WORKER], work)
    except BadInput as err:
        too_long = "longer than" in str(err)
        raise (web.HTTPRequestEntityTooLarge if too_long else web.HTTPBadRequest)(text=str(err)) from None
    return web.json_response(result)


async def speakers(request: web.Request) -> web.Response:
    return web.json_response(request.app[TRANSCRIBER].speakers())


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def make_app(model: Transcriber, max_bytes: int) -> web.Application:
    app = web.Application(client_max_size=max_bytes)
    app[TRANSCRIBER] = model
    app[WORKER] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")  # the model is not thread-safe

    async def stop_worker(app: web.Application) -> None:
        app[WORKER].shutdown(wait=True)

    app.on_cleanup.append(stop_worker)
    app.add_routes([web.post("/transcribe", transcribe), web.get("/speakers", speakers), web.get("/health", health)])
    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--expdir", type=Path, required=True, help="a recipe's experiment folder (fp/, nf4/, sat/, adapters/)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--beam-size", type=int, default=1)
    p.add_argument("--ctc-weight", type=float, default=0.5, help="Conformer: CTC weight of the beam search")
    p.add_argument("--cache", type=int, default=8, help="adapters kept in memory at once")
    p.add_argument("--max-mb", type=float, default=20.0, help="largest request body accepted")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    setup_logging()
    model = Transcriber(a.expdir, a.device, a.beam_size, a.ctc_weight, cache=a.cache)
    logging.info(f"serving {a.expdir} on http://{a.host}:{a.port}")
    web.run_app(make_app(model, int(a.max_mb * 1e6)), host=a.host, port=a.port, shutdown_timeout=60,
                print=None)


def run() -> None:
    """The ``pqm-serve`` console script."""
    cli(main)


if __name__ == "__main__":
    run()

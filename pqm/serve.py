"""An HTTP service: one NF4 base model in memory, each speaker's adapter loaded on demand.

    python -m pqm.serve --expdir exp/speechocean762_whisper --port 8000
    curl -F audio=@a.wav -F speaker=1031 http://localhost:8000/transcribe

Endpoints:

- ``POST /transcribe``: multipart form with ``audio`` (a file libsndfile reads)
  and optionally ``speaker``; returns JSON (speaker, system, hypothesis,
  seconds from arrival to answer, ``batch``: requests decoded together,
  ``decode_seconds``: that batch's decoding). A speaker without an adapter is served by the SAT adapter and the
  ``system`` field says so. Bad input gets a 4xx with the reason, and the
  server keeps serving: not audio or empty audio (400), audio longer than the
  model reads (413), a body over ``--max-mb`` (413), an unsafe speaker id (400).
- ``GET /speakers``: the speakers with an adapter on disk now (an adapter
  written while the server runs is used from the next request on, no restart)
  and the adapters loaded in memory (at most ``--cache``).
- ``GET /health``.

Built on aiohttp (asyncio, one process): decoding runs in one worker thread,
so the event loop keeps accepting requests and answers health checks
meanwhile. Requests that arrive within ``--batch-window-ms`` of the first
waiting one (at most ``--batch-size``) are decoded together in one
mixed-speaker batch, each through its own speaker's adapter
(:meth:`pqm.transcribe.Transcriber.transcribe_mixed`; ``--batch-window-ms 0``:
one request at a time). A batch that fails is decoded again one request at a
time, so that a bad request gets its own error and the others their answers.
Whisper adapters trained on trimmed input (``--whisper-window trimmed``) are
decoded on the batch's longest clip, so a batch mate can change a hypothesis
slightly, as batching does in stage 8; on the 30 s window, and for the
Conformer, batched hypotheses are the ones decoded alone.
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

from pqm.errors import BadInput, check_safe_id, cli, setup_logging
from pqm.transcribe import Transcriber, audio_cut

TRANSCRIBER = web.AppKey("transcriber", Transcriber)


class Batcher:
    """Collects requests for up to ``window`` seconds (at most ``size``) and decodes them in one batch."""

    def __init__(self, model: Transcriber, worker: ThreadPoolExecutor, window: float, size: int) -> None:
        self.model, self.worker, self.window, self.size = model, worker, window, max(1, size)
        self.queue: asyncio.Queue = asyncio.Queue()
        self.count = 0

    async def submit(self, cut, speaker: str | None) -> dict:
        """The answer to one request (raises what decoding it alone raises)."""
        self.count += 1
        done = asyncio.get_running_loop().create_future()
        await self.queue.put((cut.with_id(f"request{self.count}"), speaker, done))
        return await done

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.window
            while len(batch) < self.size and (left := deadline - loop.time()) > 0:
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            answers = await loop.run_in_executor(self.worker, self.decode, batch)
            for (_, _, done), answer in zip(batch, answers):
                if not done.done():
                    (done.set_exception if isinstance(answer, Exception) else done.set_result)(answer)

    def decode(self, batch: list) -> list:
        """Each request's answer or error: all in one batch, or one by one if the batch fails."""
        try:
            return self._answers(batch)
        except Exception as err:  # noqa: BLE001 (each request is retried alone and gets its own error)
            if len(batch) == 1:
                return [err]
            return [self.decode([request])[0] for request in batch]

    def _answers(self, batch: list) -> list[dict]:
        start = time.time()
        chosen = [self.model.adapter_of(speaker) for _, speaker, _ in batch]
        hyps = self.model.transcribe_mixed([cut for cut, _, _ in batch], [adapter for adapter, _ in chosen])
        return [{"speaker": speaker, "system": system, "hypothesis": hyps[cut.id], "batch": len(batch),
                 "decode_seconds": round(time.time() - start, 3)} for (cut, speaker, _), (_, system) in zip(batch, chosen)]


BATCHER = web.AppKey("batcher", Batcher)


async def transcribe(request: web.Request) -> web.Response:
    start = time.time()
    fields: dict[str, bytes | str] = {}
    async for part in await request.multipart():
        fields[part.name or ""] = await part.read() if part.name == "audio" else await part.text()
    audio = fields.get("audio")
    if not audio:
        raise web.HTTPBadRequest(text="no audio: send a multipart form with an 'audio' file (and 'speaker')")
    speaker = str(fields["speaker"]) if fields.get("speaker") else None
    try:
        if speaker is not None:
            check_safe_id(speaker)
        cut = await asyncio.get_running_loop().run_in_executor(None, read_audio, audio)
        result = await request.app[BATCHER].submit(cut, speaker)
    except BadInput as err:
        too_long = "longer than" in str(err)
        raise (web.HTTPRequestEntityTooLarge if too_long else web.HTTPBadRequest)(text=str(err)) from None
    return web.json_response({**result, "seconds": round(time.time() - start, 3)})


def read_audio(audio: bytes):
    """A cut of the uploaded audio, held in memory (refused as :func:`pqm.transcribe.audio_cut` refuses)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "audio"
        path.write_bytes(audio)
        return audio_cut(path, "request").move_to_memory(audio_format="flac")


async def speakers(request: web.Request) -> web.Response:
    return web.json_response(request.app[TRANSCRIBER].speakers())


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def make_app(model: Transcriber, max_bytes: int, batch_window: float = 0.02, batch_size: int = 8) -> web.Application:
    """The service; requests within ``batch_window`` seconds (at most ``batch_size``) are decoded together."""
    app = web.Application(client_max_size=max_bytes)
    app[TRANSCRIBER] = model

    async def batching(app: web.Application):
        worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")  # the model is not thread-safe
        app[BATCHER] = Batcher(model, worker, batch_window, min(batch_size, model.cache))
        task = asyncio.create_task(app[BATCHER].run())
        yield
        task.cancel()  # after the requests in flight were answered (aiohttp's graceful shutdown)
        worker.shutdown(wait=True)

    app.cleanup_ctx.append(batching)
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
    p.add_argument("--batch-window-ms", type=float, default=20.0,
                   help="decode requests that arrive within this many ms together (0: one at a time)")
    p.add_argument("--batch-size", type=int, default=8, help="requests per batch at most (and at most --cache)")
    p.add_argument("--max-mb", type=float, default=20.0, help="largest request body accepted")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    setup_logging()
    model = Transcriber(a.expdir, a.device, a.beam_size, a.ctc_weight, cache=a.cache)
    logging.info(f"serving {a.expdir} on http://{a.host}:{a.port}")
    app = make_app(model, int(a.max_mb * 1e6), a.batch_window_ms / 1000, a.batch_size)
    web.run_app(app, host=a.host, port=a.port, shutdown_timeout=60,
                print=None)


def run() -> None:
    """The ``pqm-serve`` console script."""
    cli(main)


if __name__ == "__main__":
    run()

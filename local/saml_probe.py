#!/usr/bin/env python3
"""Probe of a SAML-style mixture of LoRA experts for speakers with no adaptation data (issue 14's ``saml``).

Not a recipe system: this measures whether mixing experts can beat ``nf4_sat`` before the recipe
gets the stages for it. The NF4 model gets every adapter in ``--experts DIR/<name>`` (trained
beforehand with ``python -m pqm.adapt --init <sat> --cuts <that group's training cuts>``), all
active at once (peft's multi-adapter ``set_adapter``), each LoRA layer's ``scaling`` multiplied
by the expert's weight for the utterance. ``--mode``:

- ``router``: a linear layer on the mean output of the NF4 encoder without adapters, softmax over
  the experts, trained on the training cuts with the experts frozen (``--epochs``, ``--lr``);
- ``uniform``: every expert at 1/K (with a single "expert", the SAT adapter: ``nf4_sat``);
- ``oracle``: each test speaker's own group's expert (``--oracle`` JSON: speaker -> expert).

It decodes the evaluation cuts of every test speaker (Whisper: batches of 8, each row with its own
weights, the temperature fallback's sub-batches followed by their rows) and prints one JSON line:
errors overall and per speaker, and the mean weights per speaker. Measured results and the
commands: egs/fsdd/README.md and egs/speechocean762/README.md ("A mixture of LoRA experts").
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
from lhotse import CutSet
from lhotse.dataset.collation import collate_audio
from peft.tuners.lora import LoraLayer

from pqm.batches import at_16k
from pqm.errors import setup_logging
from pqm.families import family, family_of
from pqm.lora import load_adapter
from pqm.nf4 import to_nf4
from pqm.recipes import split_digits
from pqm.score import count_errors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fp", type=Path, required=True, help="the experiment's fp/ folder")
    p.add_argument("--nf4", type=Path, required=True, help="the experiment's nf4/ folder")
    p.add_argument("--manifests", type=Path, required=True, help="stage 2's manifests folder")
    p.add_argument("--corpus", default="fsdd", help="the manifests' corpus name")
    p.add_argument("--experts", type=Path, required=True, help="a folder of LoRA adapters, one per expert")
    p.add_argument("--mode", default="router", choices=("router", "uniform", "oracle"))
    p.add_argument("--oracle", type=Path, help="--mode oracle: JSON of test speaker -> expert name")
    p.add_argument("--epochs", type=int, default=2, help="router training epochs")
    p.add_argument("--lr", type=float, default=3e-3, help="router learning rate")
    p.add_argument("--max-duration", type=float, default=0, help="router batches of at most this many seconds")
    p.add_argument("--window", default="padded", choices=("padded", "trimmed"), help="Whisper input")
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--tps", type=float, default=0, help="Whisper: at most this many tokens per second (+ 8)")
    a = p.parse_args()
    setup_logging()
    torch.manual_seed(0)
    models, whisper = family(a.fp), family_of(a.fp) == "whisper"
    rec = models.recognizer(a.fp, "cpu", a.beam, 0.5)
    fingerprint = to_nf4(rec.model, a.nf4)
    names = sorted(d.name for d in a.experts.iterdir() if (d / "adapter_model.safetensors").exists())
    model = rec.model
    for name in names:
        model = load_adapter(model, a.experts / name, fingerprint, name=name)
    model.base_model.set_adapter(names, inference_mode=True)
    net = model.base_model.model
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    base = {id(m): dict(m.scaling) for m in layers}
    logging.info(f"experts {names}; {len(layers)} LoRA layers")

    def set_weights(w: torch.Tensor) -> None:
        """Expert k's output in every LoRA layer times w[..., k]: (K,) for all rows, (B, K) per row."""
        for m in layers:
            for k, name in enumerate(names):
                m.scaling[name] = base[id(m)][name] * (w[:, k].view(-1, 1, 1) if w.dim() == 2 else float(w[k]))

    def summary(batch: dict) -> torch.Tensor:
        """The mean output of the NF4 encoder without adapters, one row per utterance."""
        with model.disable_adapter(), torch.no_grad():
            if whisper:
                from pqm.families.whisper import set_encoder_window

                set_encoder_window(net, batch["input_features"].shape[-1])
                return net.model.encoder(input_features=batch["input_features"]).last_hidden_state.mean(1)
            enc, lens = net.encode(batch["speech"], batch["speech_lengths"])
            mask = (torch.arange(enc.shape[1])[None] < lens[:, None]).float().unsqueeze(-1)
            return (enc * mask).sum(1) / mask.sum(1)

    router = None
    if a.mode == "router":
        train = CutSet.from_file(a.manifests / f"{a.corpus}_cuts_train.jsonl.gz")
        batches_of = models.batch_iterator(a.fp, a.window)
        for epoch in range(a.epochs):
            net.train()
            for m in net.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
            total = count = 0
            for batch in batches_of(train, 16, epoch=epoch, seed=0, max_duration=a.max_duration):
                s = summary(batch)
                if router is None:
                    router = torch.nn.Linear(s.shape[-1], len(names))
                    torch.nn.init.zeros_(router.weight)
                    torch.nn.init.zeros_(router.bias)
                    optim = torch.optim.AdamW(router.parameters(), lr=a.lr, weight_decay=0.0)
                set_weights(torch.softmax(router(s), -1))
                loss = net(**batch)[0]
                optim.zero_grad()
                loss.backward()
                optim.step()
                total, count = total + loss.item(), count + 1
            logging.info(f"router epoch {epoch + 1}: mean loss {total / count:.3f}")
        net.eval()

    cuts = list(CutSet.from_file(a.manifests / f"{a.corpus}_cuts_eval.jsonl.gz"))
    oracle = json.loads(a.oracle.read_text()) if a.mode == "oracle" else {}
    weights = {}
    for cut in cuts:
        if a.mode == "router":
            if whisper:
                from pqm.families.whisper import features

                batch = {"input_features": features(rec.processor, [cut], a.window)}
            else:
                speech, lengths = collate_audio(CutSet.from_cuts(at_16k([cut])))
                batch = {"speech": speech, "speech_lengths": lengths}
            with torch.no_grad():
                weights[cut.id] = torch.softmax(router(summary(batch)), -1)[0]
        elif a.mode == "oracle":
            weights[cut.id] = torch.nn.functional.one_hot(torch.tensor(names.index(oracle[cut.supervisions[0].speaker])),
                                                          len(names)).float()
        else:
            weights[cut.id] = torch.full((len(names),), 1.0 / len(names))
    rec.set_window(a.window)
    hyps = {}
    if whisper:
        from pqm.families.whisper import features, rows_of

        for i in range(0, len(cuts), 8):
            chunk = cuts[i:i + 8]
            feats = features(rec.processor, chunk, a.window)
            rows_weights = torch.stack([weights[c.id] for c in chunk])

            def follow(module, args, kwargs):
                encoded = kwargs["input_features"] if "input_features" in kwargs else args[0]
                set_weights(rows_weights[rows_of(encoded, feats)])

            handle = net.model.encoder.register_forward_pre_hook(follow, with_kwargs=True)
            hyps.update(rec.transcribe(chunk, desc="eval", tokens_per_second=a.tps))
            handle.remove()
    else:
        for cut in cuts:
            set_weights(weights[cut.id])
            hyps.update(rec.transcribe([cut], desc="eval"))

    normalise = models.text_normaliser(a.fp, split_digits(a.manifests))
    refs = {c.id: normalise(c.supervisions[0].text or "") for c in cuts}
    speakers: dict[str, list[str]] = {}
    for c in cuts:
        speakers.setdefault(c.supervisions[0].speaker, []).append(c.id)
    errors = {s: count_errors([refs[u] for u in us], [normalise(hyps[u]) for u in us])["errors"]
              for s, us in sorted(speakers.items())}
    total = count_errors([refs[u] for u in sorted(refs)], [normalise(hyps[u]) for u in sorted(refs)])
    mean_weights = {s: [round(x, 3) for x in torch.stack([weights[u] for u in us]).mean(0).tolist()]
                    for s, us in sorted(speakers.items())}
    print(json.dumps({"mode": a.mode, "experts": names, "total": total, "errors_per_speaker": errors,
                      "mean_weights": mean_weights}))


if __name__ == "__main__":
    main()

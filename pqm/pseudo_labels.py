"""Targets without transcripts (``pqm_unsup``): the adapted model's own hypotheses, the most confident kept.

The speaker's adaptation audio is decoded by the model the adapter starts
from (the NF4 base with the SAT adapter: ``nf4_sat``), in the window that
adapter was trained in, or by another labeller: ``saml``, each utterance
through its own routing weights over the experts (``routes``, as stage 8
decodes ``saml``). Each hypothesis is scored by the same model as a
training target: its training loss per token (the family's ``token_loss``:
Whisper's cross-entropy; ESPnet's CTC/attention loss), so that a low loss is
a confident hypothesis. The ``keep`` fraction with the lowest loss become
the targets; ``<unk>`` is dropped from a hypothesis (it is not a word to
learn), and empty hypotheses or those the tokenizer cannot encode are never
kept. The transcripts of the cuts are never read.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch
from lhotse import CutSet
from lhotse.utils import fastcopy

from pqm.errors import BadInput
from pqm.lora import Row, per_row


def with_text(cut, text: str):
    """``cut`` with its (single) supervision's text replaced."""
    return cut.map_supervisions(lambda sup: fastcopy(sup, text=text))


@torch.no_grad()
def target_loss(model: torch.nn.Module, cut, batches_of: Callable, per_token: Callable, device: str) -> float:
    """The model's training loss per token of ``cut`` alone (its text as the target); infinite for a text that
    cannot be a target (empty, or not encodable by the model's tokenizer)."""
    if not (cut.supervisions[0].text or "").strip():
        return math.inf
    try:
        batch = next(iter(batches_of(CutSet.from_cuts([cut]), 1)))
    except BadInput:
        return math.inf
    return per_token(model(**{k: v.to(device) for k, v in batch.items()})[0], batch)


def pseudo_labelled(rec, cuts: CutSet, batches_of: Callable, per_token: Callable, keep: float, device: str = "cpu",
                    routes: dict[str, Row] | None = None) -> tuple[CutSet, dict]:
    """The cuts whose hypotheses by ``rec`` (its model as it is now; with ``routes``, each cut through its own
    mixture of the loaded adapters, :class:`pqm.lora.RowAdapters`) are the most confident, with those
    hypotheses as their text, and a report: every hypothesis, its loss, and whether it was kept."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep {keep}: a fraction in (0, 1] is needed")
    rec.model.eval()
    adapters = [routes[cut.id] for cut in cuts] if routes is not None else None
    hyps = {cut_id: " ".join(w for w in text.split() if w != "<unk>")
            for cut_id, text in rec.transcribe(cuts, desc="pseudo-labels", adapters=adapters).items()}
    scored = {}
    with per_row(rec.model, adapters) as rows:
        for cut in cuts:
            if rows is not None:
                rows.names = [routes[cut.id]]
            scored[cut.id] = target_loss(rec.model, with_text(cut, hyps[cut.id]), batches_of, per_token, device)
    ranked = sorted((loss, cut_id) for cut_id, loss in scored.items() if math.isfinite(loss))
    kept = {cut_id for _, cut_id in ranked[: max(1, round(keep * len(cuts)))]} if ranked else set()
    report = {cut_id: {"hypothesis": hyps[cut_id], "loss": scored[cut_id] if math.isfinite(scored[cut_id]) else None,
                       "kept": cut_id in kept} for cut_id in sorted(scored)}
    logging.info(f"pseudo-labels: kept {len(kept)} of {len(cuts)} hypotheses (the {keep:.0%} with the lowest loss)")
    return CutSet.from_cuts(with_text(c, hyps[c.id]) for c in cuts if c.id in kept), report

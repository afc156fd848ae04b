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

Token masking (``token_floor`` > 0, STAR's idea, arXiv 2405.14161, with the
plain token confidence): within a kept hypothesis, the tokens to which the
same model, reading the hypothesis as its target, gives a probability below
the floor (the family's ``token_probs``) are left out of the loss
(``token_mask``, :mod:`pqm.batches`); a hypothesis none of whose tokens
reaches the floor is not kept.

The training transcripts' token prior (``token_bias``, :func:`prior_bias`):
a labeller that is half wrong is wrong the same way for a whole speaker (on
the digit task, ``nf4_sat`` writes "eight" 110 times for george, who says
it 51 times, and "seven" 10 times for 44), and self-training teaches it
those errors. Before labelling, a per-speaker bias of the decoder's tokens
brings the token distribution of the labeller's hypotheses of the speaker's
audio to that of the training transcripts, the prior-adjustment EM of
Saerens et al. (2002) with a half step: each iteration decodes the audio with
the bias so far and adds half the log ratio of the training prior to the
hypotheses' (add-one smoothed) frequency of each training token. The labels
are then decoded with that bias and scored without it. The trained adapter
gets a bias of its own, estimated the same way from its hypotheses of the
same audio, and decodes the speaker under it (stage 8). It reads the training
speakers' transcripts, never this speaker's; families whose recognizer has
``set_token_bias`` only (ESPnet).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import Counter
from typing import Callable, Iterable, Iterator

import torch
from lhotse import CutSet
from lhotse.utils import fastcopy

from pqm.batches import TOKEN_MASK
from pqm.errors import BadInput
from pqm.lora import Row, per_row


def with_text(cut, text: str, mask: list[int] | None = None):
    """``cut`` with its (single) supervision's text replaced, and its token mask with ``mask`` (none: a new
    text has no mask)."""
    def change(sup):
        custom = {k: v for k, v in (sup.custom or {}).items() if k != TOKEN_MASK}
        if mask is not None:
            custom[TOKEN_MASK] = mask
        return fastcopy(sup, text=text, custom=custom or None)

    return cut.map_supervisions(change)


@torch.no_grad()
def target_scores(model: torch.nn.Module, cut, batches_of: Callable, per_token: Callable, device: str,
                  token_probs: Callable | None = None) -> tuple[float, list[float]]:
    """The model's training loss per token of ``cut`` alone (its text as the target; infinite for a text that
    cannot be a target: empty, or not encodable by the model's tokenizer) and, with ``token_probs`` (the
    family's), the probability of each target token (else ``[]``)."""
    if not (cut.supervisions[0].text or "").strip():
        return math.inf, []
    try:
        batch = next(iter(batches_of(CutSet.from_cuts([cut]), 1)))
    except BadInput:
        return math.inf, []
    batch = {k: v.to(device) for k, v in batch.items()}
    output = model(**batch)
    return per_token(output[0], batch), token_probs(model, output, batch) if token_probs else []


def target_loss(model: torch.nn.Module, cut, batches_of: Callable, per_token: Callable, device: str) -> float:
    """The loss per token of :func:`target_scores`."""
    return target_scores(model, cut, batches_of, per_token, device)[0]


PRIOR_STEP = 0.5  # of the log ratio, per iteration of prior_bias (a whole step overshot on the digit task)


def token_counts(texts: Iterable[str], tokens_of: Callable[[str], list[str]]) -> Counter:
    """How often each token occurs in ``texts``, tokenised by ``tokens_of`` (the recognizer's ``tokens``)."""
    return Counter(token for text in texts for token in tokens_of(text))


@contextlib.contextmanager
def biased(rec, bias: dict[str, float] | None) -> Iterator[None]:
    """``rec`` decodes with its tokens biased by ``bias`` (none or ``{}``: as it is) inside the block, and
    without a bias after it."""
    if not bias:
        yield
        return
    rec.set_token_bias(bias)
    try:
        yield
    finally:
        rec.set_token_bias({})


def biased_hypotheses(rec, cuts: CutSet, desc: str, bias: dict[str, float] | None = None,
                      routes: dict[str, Row] | None = None) -> dict[str, str]:
    """``rec``'s hypotheses of ``cuts`` (with ``routes``, each cut through its own mixture), its decoding biased
    by ``bias`` (none or ``{}``: as it is); ``rec`` is left without a bias."""
    with biased(rec, bias):
        return rec.transcribe(cuts, desc=desc, adapters=[routes[cut.id] for cut in cuts] if routes is not None else None)


def prior_bias(rec, cuts: CutSet, prior: Counter, iterations: int, routes: dict[str, Row] | None = None
               ) -> dict[str, float]:
    """The bias of each token of ``prior`` (the training transcripts' token counts) that brings the frequency
    of its tokens in ``rec``'s hypotheses of ``cuts`` towards the prior's, after ``iterations`` half steps
    (module docstring); ``rec`` is left without a bias."""
    total = sum(prior.values())
    bias: dict[str, float] = {}
    for it in range(iterations):
        hyps = biased_hypotheses(rec, cuts, f"token prior {it + 1}/{iterations}", bias, routes)
        counts = token_counts(hyps.values(), rec.tokens)
        seen = sum(counts[token] for token in prior)
        bias = {token: bias.get(token, 0.0) + PRIOR_STEP * (math.log(n / total)
                                                            - math.log((counts[token] + 1) / (seen + len(prior))))
                for token, n in prior.items()}
    logging.info("token prior: bias " + ", ".join(f"{t} {b:+.2f}" for t, b in sorted(bias.items(), key=lambda x: x[1])))
    return bias


def pseudo_labelled(rec, cuts: CutSet, batches_of: Callable, per_token: Callable, keep: float, device: str = "cpu",
                    routes: dict[str, Row] | None = None, token_floor: float = 0.0,
                    token_probs: Callable | None = None, token_bias: dict[str, float] | None = None
                    ) -> tuple[CutSet, dict]:
    """The cuts whose hypotheses by ``rec`` (its model as it is now; with ``routes``, each cut through its own
    mixture of the loaded adapters, :class:`pqm.lora.RowAdapters`; with ``token_bias``, its decoding biased so,
    :func:`prior_bias`) are the most confident, with those hypotheses as their text (with ``token_floor`` > 0,
    and the family's ``token_probs``, their tokens below that probability masked), and a report: every
    hypothesis, its loss, and whether it was kept."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep {keep}: a fraction in (0, 1] is needed")
    if token_floor and token_probs is None:
        raise ValueError("token_floor needs the family's token_probs")
    rec.model.eval()
    adapters = [routes[cut.id] for cut in cuts] if routes is not None else None
    hyps = {cut_id: " ".join(w for w in text.split() if w != "<unk>")
            for cut_id, text in biased_hypotheses(rec, cuts, "pseudo-labels", token_bias, routes).items()}
    scored, probs = {}, {}
    with per_row(rec.model, adapters) as rows:
        for cut in cuts:
            if rows is not None:
                rows.names = [routes[cut.id]]
            scored[cut.id], probs[cut.id] = target_scores(rec.model, with_text(cut, hyps[cut.id]), batches_of,
                                                          per_token, device, token_probs if token_floor else None)
    ranked = sorted((loss, cut_id) for cut_id, loss in scored.items() if math.isfinite(loss))
    kept = {cut_id for _, cut_id in ranked[: max(1, round(keep * len(cuts)))]} if ranked else set()
    masks = {cut_id: [int(p >= token_floor) for p in probs[cut_id]] for cut_id in kept} if token_floor else {}
    kept -= {cut_id for cut_id, mask in masks.items() if not any(mask)}
    report = {cut_id: {"hypothesis": hyps[cut_id], "loss": scored[cut_id] if math.isfinite(scored[cut_id]) else None,
                       "kept": cut_id in kept,
                       **({"token_probs": [round(p, 6) for p in probs[cut_id]]} if token_floor else {}),
                       **({"token_mask": masks[cut_id]} if cut_id in kept and token_floor else {})}
              for cut_id in sorted(scored)}
    logging.info(f"pseudo-labels: kept {len(kept)} of {len(cuts)} hypotheses (the {keep:.0%} with the lowest loss)"
                 + (f"; {sum(m.count(0) for c, m in masks.items() if c in kept)} of their "
                    f"{sum(len(masks[c]) for c in kept)} tokens below {token_floor} masked" if token_floor else ""))
    return CutSet.from_cuts(with_text(c, hyps[c.id], masks.get(c.id)) for c in cuts if c.id in kept), report

"""Mini-batches for ESPnet's ``ASRModel.forward`` drawn from lhotse cuts.

A cut whose supervision carries ``custom["token_mask"]`` (pseudo-labels,
:mod:`pqm.pseudo_labels`) marks which of its target tokens the loss may learn
(1) or must leave out (0); a batch with such a cut gets ``token_mask``.
"""

from __future__ import annotations

import logging
import warnings
from typing import Iterable, Iterator

import torch
from lhotse import CutSet, combine
from lhotse.dataset.collation import collate_audio
from lhotse.dataset.sampling import DynamicBucketingSampler, SimpleCutSampler
from torch.nn.utils.rnn import pad_sequence

from pqm.tokens import TokenEncoder

SAMPLING_RATE = 16000
TOKEN_MASK = "token_mask"  # the supervision's custom field, and the batch's key
_resampled_from: set[int] = set()


def speed_perturbed(cuts: CutSet, factors: list[float] | None) -> CutSet:
    """``cuts`` once per speed factor, as Kaldi's and ESPnet's recipes augment their training data (lhotse's
    ``perturb_speed``: pitch, formants and tempo change together, so each factor makes every speaker sound like
    another; 1.0: the cuts as they are; ids get ``_sp<factor>``); ``cuts`` themselves where ``factors`` is empty."""
    if not factors:
        return cuts
    return combine(*(cuts if f == 1.0 else cuts.perturb_speed(f) for f in factors)).to_eager()


def cut_batches(
    cuts: CutSet, batch_size: int, epoch: int = 0, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1,
    max_duration: float = 0.0,
) -> SimpleCutSampler | DynamicBucketingSampler:
    """lhotse's sampler for one epoch: lists of at most ``batch_size`` cuts; with ``max_duration`` > 0
    instead, cuts of similar durations (10 buckets) adding up to at most ``max_duration`` seconds, so that
    little of a batch is padding.

    With ``world_size`` > 1 it gives this ``rank`` its share of the batches,
    the same number on every rank.
    """
    if max_duration > 0:
        with warnings.catch_warnings():  # lhotse advises lazy cuts to save memory: ours are small and eager
            warnings.filterwarnings("ignore", message=".*DynamicBucketingSampler with an eagerly read CutSet")
            sampler = DynamicBucketingSampler(cuts, max_duration=max_duration, num_buckets=min(10, len(cuts)),
                                              shuffle=shuffle, seed=seed, rank=rank, world_size=world_size)
    else:
        sampler = SimpleCutSampler(cuts, max_cuts=batch_size, shuffle=shuffle, seed=seed, rank=rank,
                                   world_size=world_size)
    sampler.set_epoch(epoch)
    return sampler


def at_16k(cuts: Iterable) -> list:
    """The cuts at 16 kHz, the rate every model here takes: others are resampled (and said so once per rate)."""
    out = []
    for cut in cuts:
        if cut.sampling_rate != SAMPLING_RATE:
            if cut.sampling_rate not in _resampled_from:
                logging.warning(f"audio at {cut.sampling_rate} Hz (e.g. {cut.id}): resampling to {SAMPLING_RATE} Hz")
                _resampled_from.add(cut.sampling_rate)
            cut = cut.resample(SAMPLING_RATE)
        out.append(cut)
    return out


def iterate_batches(
    cuts: CutSet, tokenizer: TokenEncoder, batch_size: int, epoch: int = 0, seed: int = 0, shuffle: bool = True,
    rank: int = 0, world_size: int = 1, max_duration: float = 0.0,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield ``speech, speech_lengths, text, text_lengths`` batches (text padded with -1) of :func:`cut_batches`."""
    for batch in cut_batches(cuts, batch_size, epoch, seed, shuffle, rank, world_size, max_duration):
        speech, speech_lengths = collate_audio(CutSet.from_cuts(at_16k(batch)))
        ids = [torch.tensor(tokenizer.encode(c.supervisions[0].text or "", where=f"cut {c.id}")) for c in batch]
        yield {
            "speech": speech,
            "speech_lengths": speech_lengths,
            "text": pad_sequence(ids, batch_first=True, padding_value=-1),
            "text_lengths": torch.tensor([len(i) for i in ids]),
            **token_masks(batch, [len(i) for i in ids]),
        }


def token_mask(cut) -> list[int] | None:
    """The cut's ``token_mask`` (1: learn the target token, 0: leave it out of the loss), or None."""
    return (cut.supervisions[0].custom or {}).get(TOKEN_MASK)


def token_masks(cuts: list, lengths: list[int]) -> dict[str, torch.Tensor]:
    """``{"token_mask": (cuts, max length) bool}`` where a cut has a mask (a cut without one, and the padding,
    learn every token), else ``{}``; ``lengths``: each cut's number of target tokens, which its mask must match."""
    masks = [token_mask(c) for c in cuts]
    if all(m is None for m in masks):
        return {}
    rows = []
    for cut, mask, n in zip(cuts, masks, lengths):
        if mask is not None and len(mask) != n:
            raise ValueError(f"cut {cut.id}: a token mask of {len(mask)} for {n} target tokens")
        rows.append(torch.tensor(mask, dtype=torch.bool) if mask is not None else torch.ones(n, dtype=torch.bool))
    return {TOKEN_MASK: pad_sequence(rows, batch_first=True, padding_value=True)}

"""pqm_unsup's token masking (``--pseudo-token-floor``): masked target tokens leave the loss, in both families."""

from __future__ import annotations

import math

import pytest
import torch
from lhotse import CutSet, MonoCut, Recording, SupervisionSegment

from conftest import FSDD
from pqm.pseudo_labels import pseudo_labelled, with_text


def fsdd_cuts(texts: list[str]) -> CutSet:
    """One real FSDD recording a text (the audio need not say it: the losses are what is compared)."""
    cuts = []
    for k, text in enumerate(texts):
        rec = Recording.from_file(FSDD / "recordings" / f"{k}_george_{k}.wav")
        sup = SupervisionSegment(rec.id, rec.id, 0.0, rec.duration, text=text, speaker="george")
        cuts.append(MonoCut(rec.id, 0.0, rec.duration, 0, recording=rec, supervisions=[sup]))
    return CutSet.from_cuts(cuts)


def batch_of(batches_of, cut, mask: list[int] | None = None) -> dict[str, torch.Tensor]:
    return next(iter(batches_of(CutSet.from_cuts([with_text(cut, cut.supervisions[0].text, mask)]), 1, seed=0)))


@torch.no_grad()
def test_espnet_attention_loss_leaves_out_the_masked_tokens(tiny_fp_dir):
    """ESPnet: without label smoothing a token's attention loss is -log p (p from ``token_probs``), so the loss
    of a mask is that of the eos alone plus -log p of each token kept; an all-ones mask is no mask; CTC learns
    an utterance whole, or not at all where a token is masked."""
    from pqm.families import espnet

    rec = espnet.recognizer(tiny_fp_dir, "cpu", beam_size=1, ctc_weight=0.5)
    model = rec.model.eval()
    smoothing = model.criterion_att.loss
    smoothing.smoothing, smoothing.confidence = 0.0, 1.0
    batches_of = espnet.batch_iterator(tiny_fp_dir)
    cut = fsdd_cuts(["one two three four"])[0]

    def run(mask):
        batch = batch_of(batches_of, cut, mask)
        assert ("token_mask" in batch) == (mask is not None)
        out = model(**batch)
        return out[1], espnet.token_probs(model, out, batch)

    plain, probs = run(None)
    assert len(probs) == 4 and all(0 < p < 1 for p in probs)
    all_kept = run([1, 1, 1, 1])[0]
    assert all_kept["loss_att"] == plain["loss_att"] and all_kept["loss_ctc"] == plain["loss_ctc"]
    eos_only = run([0, 0, 0, 0])[0]
    for mask in ([1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 1]):
        stats, _ = run(mask)
        expected = eos_only["loss_att"] - sum(math.log(p) for p, m in zip(probs, mask) if m)
        assert float(stats["loss_att"]) == pytest.approx(float(expected), rel=1e-5)
        assert float(stats["loss_ctc"]) == 0 < float(plain["loss_ctc"])
    with pytest.raises(ValueError, match="a token mask of 3 for 4 target tokens"):
        run([1, 1, 1])


@torch.no_grad()
def test_whisper_loss_is_the_mean_over_the_tokens_kept(whisper_fp_dir):
    """Whisper: the cross-entropy of a masked batch is the mean of -log p over the labels kept (p from
    ``token_probs`` of the unmasked batch: the decoder reads the same tokens), in a batch of two of which one
    has no mask."""
    from pqm.families import whisper

    model = whisper.build_model(whisper_fp_dir)
    batches_of = whisper.batch_iterator(whisper_fp_dir, "trimmed")
    cuts = fsdd_cuts(["zero", "one two"])
    batch = batch_of(batches_of, cuts[1])
    probs = whisper.token_probs(model, model(**batch), batch)
    assert len(probs) == int((batch["labels"] != -100).sum()) >= 4  # no-timestamps, the words, end of text
    mask = [1] + [0] * (len(probs) - 2) + [1]
    masked = batch_of(batches_of, cuts[1], mask)
    assert torch.equal(masked["decoder_input_ids"][0, 1:], batch["labels"][0, :-1])
    expected = -sum(math.log(p) for p, m in zip(probs, mask) if m) / sum(mask)
    assert float(model(**masked).loss) == pytest.approx(expected, rel=1e-4)
    assert float(model(**batch).loss) == pytest.approx(-sum(map(math.log, probs)) / len(probs), rel=1e-4)

    alone = int((batch_of(batches_of, cuts[0])["labels"] != -100).sum())
    mixed = next(iter(batches_of(CutSet.from_cuts([cuts[0], with_text(cuts[1], "one two", mask)]), 2)))
    assert "decoder_input_ids" in mixed and int((mixed["labels"] != -100).sum()) == alone + sum(mask)


@torch.no_grad()
def test_pseudo_labels_mask_their_unconfident_tokens(tiny_fp_dir):
    """``token_floor``: a kept hypothesis's tokens below it are masked (as the model scores them), one whose
    every token is below it is not kept, and the report gives each hypothesis's token probabilities."""
    from pqm.families import espnet

    rec = espnet.recognizer(tiny_fp_dir, "cpu", beam_size=1, ctc_weight=0.5)
    cuts = fsdd_cuts(["nine", "one two", "three four five"])
    hyps = {cut.id: text for cut, text in zip(cuts, ["five five", "two", "six seven eight nine"])}
    rec.transcribe = lambda cuts, desc, adapters=None: {c.id: hyps[c.id] for c in cuts}  # the model scores them
    label = dict(batches_of=espnet.batch_iterator(tiny_fp_dir), per_token=espnet.token_loss, keep=1.0,
                 token_probs=espnet.token_probs)
    _, report = pseudo_labelled(rec, cuts, **label, token_floor=1e-9)
    probs = sorted(p for r in report.values() for p in r["token_probs"])
    floor = (probs[2] + probs[3]) / 2  # between the third and the fourth least probable of the 7 tokens
    kept, report = pseudo_labelled(rec, cuts, **label, token_floor=floor)
    for cut_id, row in report.items():
        assert len(row["token_probs"]) == len(hyps[cut_id].split())
        mask = [int(p >= floor) for p in row["token_probs"]]
        assert row["kept"] == any(mask) and row.get("token_mask") == (mask if any(mask) else None)
    assert sum(r.get("token_mask", []).count(0) for r in report.values() if r["kept"]) + \
        sum(len(r["token_probs"]) for r in report.values() if not r["kept"]) == 3
    assert {c.id: c.supervisions[0].custom["token_mask"] for c in kept} == \
        {cut_id: r["token_mask"] for cut_id, r in report.items() if r["kept"]}
    assert all(c.supervisions[0].text == hyps[c.id] for c in kept)
    _, plain = pseudo_labelled(rec, cuts, **label)
    assert all("token_probs" not in r and r["kept"] for r in plain.values())  # no floor: as before

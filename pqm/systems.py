"""The systems a recipe compares, and what stage 7 trains for each per-speaker one.

``fp`` (full precision), ``nf4`` (quantised) and ``nf4_sat`` (+ the SAT LoRA)
are speaker-independent, and so is ``saml`` (a mixture of LoRA experts routed per utterance,
:mod:`pqm.saml`). ``nf4_sa``, ``pqm`` and ``pqm_unsup`` have one LoRA
adapter per test speaker (stage 7); a speaker without one is decoded with the
system's fallback, and the results say so.
"""

from __future__ import annotations

from dataclasses import dataclass

SYSTEMS = ("fp", "nf4", "nf4_sat", "nf4_sa", "pqm", "pqm_unsup", "saml")  # the order stage 8 builds them on one model
DEFAULT_SYSTEMS = SYSTEMS[:5]  # pqm_unsup only with stage 7's --unsup, saml only with stage 6's --saml-experts


@dataclass(frozen=True)
class Adapted:
    """How stage 7 trains a per-speaker system's adapter, and what decodes a speaker without one."""

    from_sat: bool  # start from the SAT adapter (else a new LoRA on the bare NF4 model)
    targets: str  # "transcripts", or "pseudo": the starting model's own hypotheses (pqm.pseudo_labels)
    fallback: str


# The per-speaker systems, in the order stage 7 trains them.
ADAPTED = {
    "pqm": Adapted(from_sat=True, targets="transcripts", fallback="nf4_sat"),
    "nf4_sa": Adapted(from_sat=False, targets="transcripts", fallback="nf4"),
    "pqm_unsup": Adapted(from_sat=True, targets="pseudo", fallback="nf4_sat"),
}

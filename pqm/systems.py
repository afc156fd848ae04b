"""The systems a recipe compares, and what stage 7 trains for each per-speaker one.

``fp`` (full precision), ``nf4`` (quantised) and ``nf4_sat`` (+ the SAT LoRA)
are speaker-independent, and so is ``saml`` (a mixture of LoRA experts routed per utterance,
:mod:`pqm.saml`). ``nf4_sa``, ``pqm``, ``pqm_unsup`` and ``saml_sa`` have one LoRA
adapter per test speaker (stage 7); a speaker without one is decoded with the
system's fallback, and the results say so.
"""

from __future__ import annotations

from dataclasses import dataclass

SYSTEMS = ("fp", "nf4", "nf4_sat", "nf4_sa", "pqm", "pqm_unsup", "saml", "saml_sa")  # the order stage 8 builds them
DEFAULT_SYSTEMS = SYSTEMS[:5]  # pqm_unsup only with stage 7's --unsup, saml and saml_sa with stage 6's --saml-experts


@dataclass(frozen=True)
class Adapted:
    """How stage 7 trains a per-speaker system's adapter, and what decodes a speaker without one."""

    start: str  # "sat": the SAT adapter; "new": a new LoRA on the bare NF4 model; "saml": saml's experts merged
    targets: str  # "transcripts", or "pseudo": the starting model's own hypotheses (pqm.pseudo_labels)
    fallback: str


# The per-speaker systems, in the order stage 7 trains them.
ADAPTED = {
    "pqm": Adapted(start="sat", targets="transcripts", fallback="nf4_sat"),
    "nf4_sa": Adapted(start="new", targets="transcripts", fallback="nf4"),
    "pqm_unsup": Adapted(start="sat", targets="pseudo", fallback="nf4_sat"),
    "saml_sa": Adapted(start="saml", targets="transcripts", fallback="saml"),
}

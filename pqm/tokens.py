"""Word token list and the text <-> token-id mapping used by ESPnet and by LoRA training."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from pqm.fsutil import BadInput

BLANK, UNK, SOS_EOS = "<blank>", "<unk>", "<sos/eos>"


def build_token_list(texts: Iterable[str]) -> list[str]:
    """ESPnet's word token list: ``<blank> <unk> words... <sos/eos>``."""
    words = sorted({w for text in texts for w in text.split()})
    return [BLANK, UNK, *words, SOS_EOS]


def read_token_list(path: str | Path) -> list[str]:
    """Read one token per line."""
    return Path(path).read_text(encoding="utf-8").split()


class WordTokenizer:
    """Map transcripts to ids of a word token list, refusing unknown words."""

    def __init__(self, token_list: list[str]) -> None:
        self.token_list = token_list
        self.index = {tok: i for i, tok in enumerate(token_list)}

    def encode(self, text: str, where: str = "") -> list[int]:
        """Return the ids of ``text``; an unknown or empty transcript is an error naming ``where``."""
        words = text.split()
        if not words:
            raise BadInput(f"empty transcript{' in ' + where if where else ''}")
        unknown = sorted({w for w in words if w not in self.index or w in (BLANK, UNK, SOS_EOS)})
        if unknown:
            raise BadInput(
                f"transcript{' of ' + where if where else ''} has words outside the token list: "
                f"{unknown}; fix the transcript or rebuild the token list (stage 3)"
            )
        return [self.index[w] for w in words]

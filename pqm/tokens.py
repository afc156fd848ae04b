"""ESPnet token lists (words, or sentencepiece BPE) and the text -> token-id mapping LoRA training uses.

Stage 3 writes ``<datadir>/token_list/<word|bpe_unigramN>/tokens.txt`` (and
``bpe.model``) the way ESPnet's ``asr.sh`` does: sentencepiece's unigram
trainer on the training transcripts, then ESPnet's ``tokenize_text`` for the
vocabulary. Later stages read the tokens from the model's own ``config.yaml``
(``token_list``, ``token_type``, ``bpemodel``), so an adapter is always
trained on the ids its model was trained with.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

from pqm.fsutil import BadInput

BLANK, UNK, SOS_EOS = "<blank>", "<unk>", "<sos/eos>"
TOKEN_TYPES = ("word", "bpe")


def token_dir_name(token_type: str, nbpe: int) -> str:
    """``word`` or ``bpe_unigram<nbpe>``: the folder under ``<datadir>/token_list`` (as ESPnet names it)."""
    if token_type not in TOKEN_TYPES:
        raise BadInput(f"--token-type {token_type}: use one of {TOKEN_TYPES}")
    return "word" if token_type == "word" else f"bpe_unigram{nbpe}"


def build_token_list(texts: Iterable[str]) -> list[str]:
    """ESPnet's word token list: ``<blank> <unk> words... <sos/eos>``."""
    words = sorted({w for text in texts for w in text.split()})
    return [BLANK, UNK, *words, SOS_EOS]


def train_bpe(texts: list[str], nbpe: int, out_dir: Path) -> list[str]:
    """Train a sentencepiece unigram model on ``texts`` into ``out_dir/bpe.model``; return ESPnet's token list.

    Options as in ESPnet's ``asr.sh`` (character coverage 1.0); the token list
    is ``<blank> <unk>`` + the pieces by frequency in ``texts`` + ``<sos/eos>``
    (ESPnet's ``tokenize_text --write_vocabulary``).
    """
    import sentencepiece as spm
    from espnet2.bin.tokenize_text import tokenize

    out_dir.mkdir(parents=True, exist_ok=True)
    text_file = out_dir / "train_text.txt"
    text_file.write_text("\n".join(texts) + "\n", encoding="utf-8")
    try:
        spm.SentencePieceTrainer.train(input=str(text_file), model_prefix=str(out_dir / "bpe"), vocab_size=nbpe,
                                       model_type="unigram", character_coverage=1.0,
                                       input_sentence_size=100_000_000, minloglevel=2)
    except RuntimeError as err:
        raise BadInput(f"sentencepiece could not make {nbpe} pieces from {len(texts)} training transcripts "
                       f"({err}); choose a smaller --nbpe") from err
    tokens_file = out_dir / "tokens.txt"
    tokenize(input=str(text_file), output=str(tokens_file), field=None, delimiter=None, token_type="bpe",
             space_symbol="<space>", non_linguistic_symbols=None, bpemodel=str(out_dir / "bpe.model"),
             log_level="WARNING", write_vocabulary=True, vocabulary_size=0, remove_non_linguistic_symbols=False,
             cutoff=0, add_symbol=[f"{BLANK}:0", f"{UNK}:1", f"{SOS_EOS}:-1"], cleaner=None, g2p=None,
             add_nonsplit_symbol=[])
    text_file.unlink()
    tokens = read_token_list(tokens_file)
    logging.info(f"sentencepiece unigram model {out_dir / 'bpe.model'}: {len(tokens)} tokens")
    return tokens


def read_token_list(path: str | Path) -> list[str]:
    """Read one token per line."""
    return Path(path).read_text(encoding="utf-8").split()


class TokenEncoder:
    """Map transcripts to ESPnet token ids with ESPnet's own tokenizer, refusing what would become ``<unk>``."""

    def __init__(self, token_list: list[str], token_type: str = "word", bpemodel: Path | None = None) -> None:
        from espnet2.text.build_tokenizer import build_tokenizer
        from espnet2.text.token_id_converter import TokenIDConverter

        self.token_list, self.token_type = token_list, token_type
        self.tokenizer = build_tokenizer(token_type, bpemodel=str(bpemodel) if bpemodel else None)
        self.converter = TokenIDConverter(token_list, unk_symbol=UNK)

    def encode(self, text: str, where: str = "") -> list[int]:
        """Return the ids of ``text``; an unknown or empty transcript is an error naming ``where``."""
        if not text.split():
            raise BadInput(f"empty transcript{' in ' + where if where else ''}")
        tokens = self.tokenizer.text2tokens(text)
        unknown = sorted({t for t in tokens if t not in self.converter.token2id or t in (BLANK, UNK, SOS_EOS)})
        if unknown:
            what = "words" if self.token_type == "word" else "pieces (characters unseen in training)"
            raise BadInput(
                f"transcript{' of ' + where if where else ''} has {what} outside the token list: "
                f"{unknown}; fix the transcript or rebuild the token list (stage 3)"
            )
        return self.converter.tokens2ids(tokens)

"""ESPnet token lists (words, or sentencepiece BPE) and the text -> token-id mapping LoRA training uses.

Stage 3 writes ``<datadir>/token_list/<word|bpe_unigramN>/tokens.txt`` (and
``bpe.model``) the way ESPnet's ``asr.sh`` does: sentencepiece's unigram
trainer on the training transcripts, and every piece of it (``bpe.vocab``) in
the token list. Word tokens: every word of the training transcripts, which
must not mix casings of one word or carry punctuation. Later stages read the tokens from the model's own ``config.yaml``
(``token_list``, ``token_type``, ``bpemodel``), so an adapter is always
trained on the ids its model was trained with.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Iterable

from pqm.errors import BadInput

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


def check_word_transcripts(transcripts: Iterable[tuple[str, str]]) -> None:
    """Word tokens take each word as written: refuse punctuation and one word in several casings.

    ``transcripts`` gives (where, text) pairs; the error names the first offending ones.
    """
    punctuated: list[str] = []
    casings: dict[str, dict[str, str]] = {}
    for where, text in transcripts:
        for word in text.split():
            if re.search(r"[^\w'-]", word) and len(punctuated) < 3:
                punctuated.append(f"{word!r} ({where})")
            casings.setdefault(word.lower(), {}).setdefault(word, where)
    mixed = [" and ".join(f"{w!r} ({where})" for w, where in forms.items()) for forms in casings.values() if len(forms) > 1]
    problems = ([f"punctuation in {', '.join(punctuated)}"] if punctuated else []) + (
        [f"one word in several casings: {'; '.join(mixed[:3])}"] if mixed else [])
    if problems:
        raise BadInput(f"word tokens take words as written, so {'; and '.join(problems)} would be different "
                       "words: write the transcripts in one casing without punctuation, or use --token-type bpe")


def train_bpe(texts: list[str], nbpe: int, out_dir: Path) -> list[str]:
    """Train a sentencepiece unigram model on ``texts`` into ``out_dir/bpe.model``; return ESPnet's token list.

    As ESPnet's ``asr.sh`` does: character coverage 1.0, and the token list is
    ``<blank> <unk>`` + every piece of the model (``bpe.vocab`` without its
    ``<unk> <s> </s>``) + ``<sos/eos>``, so any text in the training characters
    has ids.
    """
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    text_file = out_dir / "train_text.txt"
    text_file.write_text("\n".join(texts) + "\n", encoding="utf-8")
    try:
        spm.SentencePieceTrainer.train(input=str(text_file), model_prefix=str(out_dir / "bpe"), vocab_size=nbpe,
                                       model_type="unigram", character_coverage=1.0,
                                       input_sentence_size=100_000_000, minloglevel=2)
    except RuntimeError as err:
        needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(err))
        most = re.search(r"Please set it to a value <= (\d+)", str(err))
        advice = (f"choose a larger --nbpe (at least {needed.group(1)}: the characters and sentencepiece's own pieces)"
                  if needed else f"choose a smaller --nbpe (at most {most.group(1)})" if most else "choose another --nbpe")
        raise BadInput(f"sentencepiece could not make {nbpe} pieces from {len(texts)} training transcripts: "
                       f"{advice}") from err
    finally:
        text_file.unlink()
    vocab = (out_dir / "bpe.vocab").read_text(encoding="utf-8").splitlines()
    pieces = [line.split("\t")[0] for line in vocab[3:]]  # after sentencepiece's <unk> <s> </s>
    tokens = [BLANK, UNK, *pieces, SOS_EOS]
    (out_dir / "tokens.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
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
            what = "words" if self.token_type == "word" else "pieces"
            if self.token_type == "bpe":  # every piece is listed: an unknown one holds a character never seen
                known = {c for t in self.token_list for c in t}
                unseen = sorted({c for t in unknown for c in t if c not in known})
                if unseen:
                    what, unknown = "characters unseen in training", unseen
            raise BadInput(
                f"transcript{' of ' + where if where else ''} has {what} outside the token list: "
                f"{unknown}; fix the transcript or rebuild the token list (stage 3)"
            )
        return self.converter.tokens2ids(tokens)

"""Training targets in the model's own writing style (Whisper: cased, punctuated text).

Kaldi-style corpora have uppercase, unpunctuated references. Trained on them,
a LoRA on Whisper mostly learns that format: the loss falls, the words get
worse (``../shared/docs/stack-notes.md``). Restyling a reference keeps its
words and changes only how they are written:

- ``corpus``: the reference as it is;
- ``sentence``: sentence case and a final full stop ("IT'S NOT FISH" ->
  "It's not fish.");
- ``model``: the full-precision model's own hypothesis for the utterance lends
  its spelling to every reference word it agrees with (case, punctuation
  attached to the word: "Tom's", "Bob," "donkey."), found by aligning the
  two word sequences; words it got wrong are written as in ``sentence``.

Only the writing changes: the restyled target always normalises to the same
words as the reference (:func:`word_key`), which the tests check.
"""

from __future__ import annotations

import difflib
import re

STYLES = ("corpus", "sentence", "model")


def word_key(word: str) -> str:
    """A word without case or surrounding punctuation, for comparing spellings."""
    return re.sub(r"[^\w']", "", word.lower()).strip("'")


def _sentence_case(words: list[str]) -> list[str]:
    out = [w.lower() for w in words]
    out = [("I" + w[1:] if word_key(w) in ("i", "i'm", "i'll", "i've", "i'd") else w) for w in out]
    if out:
        out[0] = out[0][:1].upper() + out[0][1:]
    return out


def restyle(reference: str, hypothesis: str | None = None, style: str = "model") -> str:
    """``reference`` written in ``style`` (see the module's docstring); ``hypothesis`` is needed for ``model``."""
    if style not in STYLES:
        raise ValueError(f"target style {style!r}: use one of {', '.join(STYLES)}")
    words = reference.split()
    if style == "corpus" or not words:
        return " ".join(words)
    out = _sentence_case(words)
    final = "."
    if style == "model" and hypothesis:
        hyp = hypothesis.split()
        matcher = difflib.SequenceMatcher(a=[word_key(w) for w in words], b=[word_key(w) for w in hyp], autojunk=False)
        for block in matcher.get_matching_blocks():
            for k in range(block.size):
                if word_key(words[block.a + k]):  # a bare punctuation token never replaces a word
                    out[block.a + k] = hyp[block.b + k]
                    if block.a + k == len(words) - 1 and block.b + k == len(hyp) - 1:
                        final = ""  # the hypothesis' own last word, with its own ending
        if final and hyp[-1][-1:] in ".?!":
            final = hyp[-1][-1]
        out[0] = out[0][:1].upper() + out[0][1:]
    if final:
        out[-1] = out[-1].rstrip(",;:") + ("" if out[-1][-1:] in ".?!" else final)
    return " ".join(out)

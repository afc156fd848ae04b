"""The Whisper model family (transformers' ``WhisperForConditionalGeneration``): ``--model whisper``.

What the stages need from a Whisper model (the interface of ``pqm.families``):
stage 4 copies a pretrained model (a local folder, or a name transformers can
resolve where there is network) into ``<expdir>/fp`` as safetensors; the LoRA
stages train on ``input_features``/``labels`` batches; decoding is
``generate`` (beam search, English, no timestamps); scoring normalises
reference and hypothesis with Whisper's English text normaliser.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import re
from pathlib import Path
from typing import Callable, Iterator

import torch
from lhotse import CutSet
from tqdm import tqdm

from pqm.batches import SAMPLING_RATE, TOKEN_MASK, at_16k, cut_batches, token_masks
from pqm.errors import BadInput, require
from pqm.families import record
from pqm.files import atomic_path

FP_MADE_BY = "stage 4 (load the pretrained Whisper model)"
DEFAULT_TARGETS = r".*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)"
TOKEN_EMBEDDING, TIED_OUTPUT = "model.decoder.embed_tokens", "proj_out"
# Left in full precision by NF4: the output projection, which shares its weight with
# the token embedding (both are quantised together only with --embeddings true),
# and the two input convolutions: in NF4 (0.5M weights in tiny.en) they made
# whisper-tiny.en emit endless repetitions, while NF4 of every Linear kept its transcripts.
KEEP_FULL_PRECISION = (TIED_OUTPUT, "model.encoder.conv1", "model.encoder.conv2")


def is_whisper_dir(path: Path) -> bool:
    """True if ``path`` holds a transformers Whisper model (``config.json`` with ``model_type: whisper``)."""
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type") == "whisper"
    except json.JSONDecodeError as err:
        raise BadInput(f"{config} is not valid JSON ({err}): restore the model folder "
                       "(a Whisper folder's config.json comes with the model)") from None


def export_pretrained(source: str, out_dir: Path) -> None:
    """Stage 4: save a pretrained Whisper model and its processor into ``out_dir`` (safetensors)."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    local = Path(source)
    if local.exists() and not is_whisper_dir(local):
        raise BadInput(f"--pretrained {source}: not a Whisper model folder (it needs config.json with "
                       "model_type 'whisper', the weights and the tokenizer files, as save_pretrained writes them)")
    model = WhisperForConditionalGeneration.from_pretrained(source, dtype=torch.float32, local_files_only=local.exists())
    processor = WhisperProcessor.from_pretrained(source, local_files_only=local.exists())
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        record(tmp, "whisper")
    logging.info(f"saved Whisper {source} ({sum(p.numel() for p in model.parameters()):,} parameters) to {out_dir}")


def build_model(fp_dir: Path, device: str = "cpu") -> torch.nn.Module:
    """The full-precision Whisper model of ``fp_dir``."""
    from transformers import WhisperForConditionalGeneration

    if not is_whisper_dir(fp_dir):
        raise BadInput(f"{fp_dir} holds no Whisper model: run {FP_MADE_BY}")
    model = WhisperForConditionalGeneration.from_pretrained(fp_dir, dtype=torch.float32, local_files_only=True)
    fit_encoder_to_input(model)
    return model.to(device).eval()


def load_processor(fp_dir: Path):
    from transformers import WhisperProcessor

    return WhisperProcessor.from_pretrained(require(fp_dir, FP_MADE_BY), local_files_only=True)


# float16 storage of what stays full precision has not been measured to change no hypothesis of every system
# here (egs/speechocean762/README.md): float32 unless --nf4-unquantised-dtype float16 asks.
UNQUANTISED_DTYPE = "float32"

# No speed perturbation of SAT by default: not measured with Whisper, which has heard many voices, and it would
# triple SAT's time (--sat-speed-perturb "0.9 1.0 1.1" asks for it).
SAT_SPEED_PERTURB = ""


def keep_full_precision(embeddings: bool = False) -> list[str]:
    """Modules NF4 leaves alone (:data:`KEEP_FULL_PRECISION`; the output projection is quantised with the
    token embedding it shares its weight with when ``embeddings``)."""
    return [m for m in KEEP_FULL_PRECISION if not (embeddings and m == TIED_OUTPUT)]


def embedding_modules() -> list[str]:
    """The token embedding, which ``--nf4-embeddings true`` quantises (with the output projection)."""
    return [TOKEN_EMBEDDING]


def omitted_keys(fp_dir: Path, model: torch.nn.Module) -> set[str]:
    """State-dict keys that share their tensor with an earlier key (Whisper's output projection)."""
    seen, tied = set(), set()
    for key, value in model.state_dict().items():
        ptr = value.data_ptr()
        if ptr in seen:
            tied.add(key)
        seen.add(ptr)
    return tied


WINDOWS = ("trimmed", "padded")
HOP = 160  # samples per log-mel frame
MAX_FRAMES = 3000  # Whisper's 30 s window


def features(processor, cuts: list, window: str = "padded") -> torch.Tensor:
    """Whisper's log-mel input features of the cuts' 16 kHz audio.

    ``window="padded"``: every clip padded to Whisper's 30 s window, as in its
    training. ``"trimmed"``: padded only to the batch's longest clip, rounded
    up to an even frame count (the encoder's second convolution has stride 2);
    the encoder then runs on that many frames (:func:`fit_encoder_to_input`),
    so a 3 s clip costs a tenth of the work. Audio over 30 s is refused.
    """
    if window not in WINDOWS:
        raise BadInput(f"Whisper input window {window!r}: use one of {', '.join(WINDOWS)}")
    cuts = at_16k(cuts)
    audio = [cut.load_audio()[0] for cut in cuts]
    too_long = [c.id for c, a in zip(cuts, audio) if len(a) > MAX_FRAMES * HOP]
    if too_long:
        raise BadInput(f"utterances {', '.join(too_long[:3])} are longer than Whisper's 30 s window: "
                       "split them into shorter segments (the whole transcript would label a cut clip)")
    if window == "padded":
        return processor.feature_extractor(audio, sampling_rate=SAMPLING_RATE, return_tensors="pt").input_features
    return processor.feature_extractor(audio, sampling_rate=SAMPLING_RATE, return_tensors="pt", padding="longest",
                                       pad_to_multiple_of=2 * HOP, truncation=False).input_features


def _encoder(model: torch.nn.Module):
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    return next(m for m in model.modules() if isinstance(m, WhisperEncoder))


def set_encoder_window(model: torch.nn.Module, frames: int) -> None:
    """Make the encoder (and ``generate``) take ``frames`` log-mel frames instead of 3000.

    transformers' encoder insists on ``max_source_positions`` x 2 frames and
    adds the first ``embed_positions.num_embeddings`` positional embeddings;
    both become ``frames // 2``, so the sinusoidal table is sliced, not changed.
    """
    if frames % 2 or not 0 < frames <= MAX_FRAMES:
        raise ValueError(f"Whisper encoder window of {frames} frames: an even number up to {MAX_FRAMES} is needed")
    encoder = _encoder(model)
    encoder.config.max_source_positions = frames // 2
    encoder.embed_positions.num_embeddings = frames // 2


def fit_encoder_to_input(model: torch.nn.Module) -> None:
    """Let every encoder call take the length of its input features (see :func:`features`)."""
    def fit(module, args, kwargs):
        feats = kwargs.get("input_features", args[0] if args else None)
        if feats is not None:
            set_encoder_window(model, feats.shape[-1])

    _encoder(model).register_forward_pre_hook(fit, with_kwargs=True)


def batch_iterator(fp_dir: Path, window: str = "padded") -> Callable[..., Iterator[dict[str, torch.Tensor]]]:
    """Batches of ``input_features`` (:func:`features` with ``window``) and ``labels`` for
    ``WhisperForConditionalGeneration.forward``.

    Labels are the tokenizer's ids of `` <transcript>`` after Whisper's prefix
    (start of transcript, no timestamps; the model shifts them right itself),
    padded with -100. A batch with token masks (:func:`pqm.batches.token_masks`,
    over the labels) gets ``decoder_input_ids`` (every label, shifted right, as
    the model would make them) and -100 for the masked labels.
    """
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import shift_tokens_right

    processor = load_processor(fp_dir)
    config = WhisperConfig.from_pretrained(fp_dir, local_files_only=True)
    tokenizer = processor.tokenizer
    tokenizer.set_prefix_tokens(predict_timestamps=False)
    start = tokenizer.convert_tokens_to_ids("<|startoftranscript|>")

    def iterate(cuts: CutSet, batch_size: int, epoch: int = 0, seed: int = 0, rank: int = 0, world_size: int = 1,
                max_duration: float = 0.0):
        for batch in cut_batches(cuts, batch_size, epoch, seed, rank=rank, world_size=world_size,
                                 max_duration=max_duration):
            texts = []
            for c in batch:
                text = (c.supervisions[0].text or "").strip()
                if not text:
                    raise BadInput(f"empty transcript in cut {c.id}")
                texts.append(" " + text)
            ids = tokenizer(texts, padding=True, return_tensors="pt")
            labels = ids.input_ids.masked_fill(ids.attention_mask == 0, -100)
            if (labels[:, 0] == start).all():
                labels = labels[:, 1:]
            out = {"input_features": features(processor, list(batch), window), "labels": labels}
            masked = token_masks(list(batch), (labels != -100).sum(1).tolist()).get(TOKEN_MASK)
            if masked is not None:
                inputs = shift_tokens_right(labels, config.pad_token_id, config.decoder_start_token_id)
                out.update(decoder_input_ids=inputs, labels=labels.masked_fill(~masked, -100))
            yield out

    return iterate


# openai-whisper's fallback, run by transformers' ``generate``: a hypothesis that compresses too
# well (a loop such as "1, 2, 1, 2, ...") or has a low mean log-probability is decoded again by
# sampling at the next temperature. Without it, whisper-tiny.en looped to max_new_tokens on 5 of 72
# connected-digit utterances of one FSDD speaker, and these insertions made up most of its WER.
DECODING = {"temperature": [0.0, 0.2, 0.4, 0.6, 0.8, 1.0], "compression_ratio_threshold": 2.4,
            "logprob_threshold": -1.0, "max_new_tokens": 128, "seed": 0}


class _QuietLengthWarning(logging.Filter):
    """Drop transformers' warning, once per batch, that ``max_new_tokens`` overrides tiny.en's ``max_length``
    (as :data:`DECODING` means it to: ``max_length`` cannot be unset, ``generate`` then warns of its default)."""

    def filter(self, entry: logging.LogRecord) -> bool:
        return "seem to have been set. `max_new_tokens` will take precedence" not in entry.getMessage()


logging.getLogger("transformers.generation.utils").addFilter(_QuietLengthWarning())


class WhisperRecognizer:
    """Decoding with ``generate`` (English, no timestamps, beam search at temperature 0, then
    openai-whisper's temperature fallback: :data:`DECODING`) on ``self.model``, adapted in place."""

    def __init__(self, fp_dir: Path, device: str = "cpu", beam_size: int = 4, batch_size: int = 8,
                 window: str = "padded") -> None:
        self.model = build_model(fp_dir, device)
        self.processor = load_processor(fp_dir)
        self.device, self.beam_size, self.batch_size, self.window = device, beam_size, batch_size, window

    def set_window(self, window: str) -> None:
        """Decode with input features in ``window`` (see :func:`features`)."""
        self.window = window

    def inputs(self, cuts) -> dict[str, torch.Tensor]:
        """The encoder's input of the cuts, one batch: ``input_features`` in the recognizer's window."""
        return {"input_features": features(self.processor, list(cuts), self.window).to(self.device)}

    def transcribe(self, cuts: CutSet, desc: str, max_new_tokens: int | None = None,
                   tokens_per_second: float = 0.0, adapters: list[str | dict[str, float]] | None = None
                   ) -> dict[str, str]:
        """Return ``{utterance id: hypothesis}``; ``max_new_tokens`` lowers :data:`DECODING`'s limit, and so
        does ``tokens_per_second`` > 0, to that many tokens per second of the batch's longest clip (+ 8):
        a hypothesis that loops then stops there instead of at 128 tokens at each fallback temperature.
        ``adapters``: the loaded LoRA adapter of each cut, or its weights over loaded adapters
        (:class:`pqm.lora.RowAdapters`), one batch for all."""
        cuts = list(cuts)
        hyps = {}
        opts = {k: v for k, v in DECODING.items() if k != "seed"}
        if max_new_tokens is not None:
            opts["max_new_tokens"] = min(max_new_tokens, opts["max_new_tokens"])
        from pqm.lora import per_row  # peft and bitsandbytes: loaded to decode, not to look a family up

        # The fallback samples from its own seed, so the same hypotheses on every run; the caller's random
        # state is left as it was (held-out decoding between epochs must not reset training's dropout).
        cuda = [torch.device(self.device)] if torch.device(self.device).type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), torch.no_grad(), per_row(self.model, adapters) as rows:
            torch.manual_seed(DECODING["seed"])
            for i in tqdm(range(0, len(cuts), self.batch_size), desc=desc, unit="batch", mininterval=5):
                batch = cuts[i : i + self.batch_size]
                limit = dict(opts)
                if tokens_per_second > 0:
                    longest = max(c.duration for c in batch)
                    limit["max_new_tokens"] = min(opts["max_new_tokens"], math.ceil(tokens_per_second * longest) + 8)
                feats = features(self.processor, batch, self.window).to(self.device)
                set_encoder_window(self.model, feats.shape[-1])  # generate pads to the window it is told
                with _following_sub_batches(self.model, rows, feats, (adapters or [])[i : i + self.batch_size]):
                    out = self.model.generate(input_features=feats, num_beams=self.beam_size,
                                              return_timestamps=False, **limit)
                for cut, text in zip(batch, self.processor.batch_decode(out, skip_special_tokens=True)):
                    hyps[cut.id] = " ".join(text.split())
        return hyps


def rows_of(sub: torch.Tensor, full: torch.Tensor) -> list[int]:
    """The rows of ``full`` that ``sub`` holds, in order: a fallback sub-batch keeps the batch's order and copies
    its rows (``generate`` may pad them to the encoder's window: the frames both have are compared)."""
    frames = min(sub.shape[-1], full.shape[-1])
    found, j = [], 0
    for row in sub:
        while j < len(full) and not torch.equal(row[..., :frames], full[j, ..., :frames]):
            j += 1
        if j == len(full):
            raise RuntimeError("generate decoded input that is not a row of the batch")
        found.append(j)
        j += 1
    return found


@contextlib.contextmanager
def _following_sub_batches(model: torch.nn.Module, rows, feats: torch.Tensor, names: list) -> Iterator[None]:
    """While ``generate`` runs: before each encoder pass (the batch, then each temperature fallback's sub-batch)
    point ``rows`` at the adapters of the rows it encodes."""
    if rows is None:
        yield
        return

    def follow(module, args, kwargs):
        encoded = kwargs["input_features"] if "input_features" in kwargs else args[0]
        rows.names = [names[j] for j in rows_of(encoded, feats)]

    handle = model.get_encoder().register_forward_pre_hook(follow, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def encoder_mean(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each clip's encoder output averaged over the frames of its input, (clips, dim); ``batch`` holds
    ``input_features`` (any other keys are ignored): in the trimmed window, the frames of the batch's longest clip."""
    feats = batch["input_features"]
    set_encoder_window(model, feats.shape[-1])
    return _encoder(model)(input_features=feats).last_hidden_state.mean(1)


def token_loss(loss: torch.Tensor, batch: dict[str, torch.Tensor]) -> float:
    """transformers' cross-entropy is already the mean over the target's tokens."""
    return float(loss)


def token_probs(model: torch.nn.Module, output, batch: dict[str, torch.Tensor]) -> list[float]:
    """The model's probability of each label of a batch of one (teacher-forced: ``output`` of its forward),
    the no-timestamps token and end of text included, as a token mask covers them."""
    labels = batch["labels"][0]
    picked = torch.log_softmax(output.logits[0].detach(), dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1))
    return picked.squeeze(-1)[labels != -100].exp().tolist()


def recognizer(fp_dir: Path, device: str, beam_size: int, ctc_weight: float) -> WhisperRecognizer:
    """The family's decoder (Whisper has no CTC branch: ``ctc_weight`` does not apply)."""
    return WhisperRecognizer(fp_dir, device=device, beam_size=beam_size)


def log_filter() -> None:
    """transformers' decoding logs nothing per utterance: no filter."""
    return None


_DIGIT_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine".split())}


def text_normaliser(fp_dir: Path | None = None, split_digits: bool = True) -> Callable[[str], str]:
    """Whisper's English text normaliser, then (``split_digits``) every digit as its own word.

    The normaliser writes numbers as digits and joins spelled-out digit runs
    into one number ("one two" -> "12"); splitting digits keeps the word error
    rate a per-digit count, as for spelled-out transcripts. A digit word it
    leaves spelled out (it writes a leading "1," as "one") becomes its digit.
    The corpus decides (``SPLIT_DIGITS`` in :mod:`pqm.recipes`): the digit task
    and speechocean762 split; LibriSpeech and TED-LIUM, where "1990" is one
    word in published Whisper results, do not.
    """
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    spelling = {}
    if fp_dir is not None and (fp_dir / "normalizer.json").exists():
        spelling = json.loads((fp_dir / "normalizer.json").read_text(encoding="utf-8"))
    normalise = EnglishTextNormalizer(spelling)

    def apply(text: str) -> str:
        words = re.sub(r"(\d)", r" \1 ", normalise(text)).split()
        return " ".join(_DIGIT_WORDS.get(w, w) for w in words)

    return apply if split_digits else normalise


def check(a: argparse.Namespace) -> None:
    """Before anything is written: ``--pretrained`` is a Whisper folder or a Hugging Face model name."""
    if not a.pretrained:
        raise BadInput("--model whisper needs --pretrained (a Whisper folder such as ../shared/models/whisper-tiny.en, "
                       "or a model name)")
    if not Path(a.pretrained).is_dir() and not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", a.pretrained):
        raise BadInput(f"--pretrained {a.pretrained}: no such folder, and not a Hugging Face model name "
                       "(owner/name, e.g. openai/whisper-tiny.en)")


def prepare(a: argparse.Namespace) -> None:
    """Stage 3: nothing (Whisper brings its own tokenizer and features)."""
    logging.info("Whisper brings its own tokenizer and features: nothing to prepare")


def train(a: argparse.Namespace) -> None:
    """Stage 4: copy the pretrained model into ``<expdir>/fp``."""
    export_pretrained(a.pretrained, a.expdir / "fp")

"""The ESPnet family (an ESPnet ASR model, e.g. the Conformer AED): ``--model conformer``.

``<expdir>/fp/`` holds the full-precision model (``config.yaml`` from ESPnet's
trainer + ``model.safetensors``, and the feature statistics and sentencepiece
model the config names). Weights are read with safetensors or
``torch.load(weights_only=True)`` only; ESPnet's own ``build_model_from_file``
is not used for weights because it unpickles. Decoding is ESPnet's
``Speech2Text`` (joint CTC/attention beam search). The interface the stages use
is the one of ``pqm.families``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from espnet.nets.scorer_interface import BatchScorerInterface
from lhotse import CutSet
from lhotse.dataset.collation import collate_audio

from pqm.batches import TOKEN_MASK, at_16k, iterate_batches
from pqm.errors import BadInput, require
from pqm.families import record
from pqm.files import atomic_path
from pqm.tokens import TokenEncoder

FP_MADE_BY = "stage 4 (train or load the model)"
# LoRA on the query and value projections of every self-attention block
DEFAULT_TARGETS = r".*(encoder\.encoders\.\d+\.self_attn|decoder\.decoders\.\d+\.self_attn)\.linear_(q|v)"
DECODING: dict = {}  # beam size and CTC weight are run.sh options


def export_fp_model(config: Path, checkpoint: Path, out_dir: Path) -> None:
    """Write ESPnet's ``config.yaml`` and a ``.pth`` state dict as ``out_dir/{config.yaml,model.safetensors}``.

    ``checkpoint`` may be a ``.pth`` (loaded with ``weights_only=True``) or a ``.safetensors`` file.
    The files the config names (feature statistics, sentencepiece model) are
    copied beside it, so the folder is self-contained.
    """
    require(config, FP_MADE_BY)
    require(checkpoint, FP_MADE_BY)
    if checkpoint.suffix == ".safetensors":
        state = load_file(str(checkpoint))
    else:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    args = yaml.safe_load(config.read_text(encoding="utf-8"))
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        stats = (args.get("normalize_conf") or {}).get("stats_file")
        if stats:
            shutil.copy(_named_file(config, stats, "stage 3 (feature statistics)"), tmp / "feats_stats.npz")
            args["normalize_conf"]["stats_file"] = "feats_stats.npz"
        if args.get("token_type") == "bpe":
            shutil.copy(_named_file(config, args.get("bpemodel") or "bpe.model", "stage 3 (token list)"), tmp / "bpe.model")
            args["bpemodel"] = "bpe.model"
        (tmp / "config.yaml").write_text(yaml.safe_dump(args, sort_keys=False), encoding="utf-8")
        state = canonical_buffers(state, build_model(tmp, load_weights=False))
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        record(tmp, "conformer")
    logging.info(f"exported the full-precision model to {out_dir}")


def _named_file(config: Path, name: str, made_by: str) -> Path:
    """A file an ESPnet config names: as given (relative to the cwd, as ESPnet writes it), or relative
    to the config's folder or one of the two above it (an unpacked model-zoo folder), or beside the config."""
    candidates = [Path(name), *(folder / name for folder in config.parents[:3]), config.parent / Path(name).name]
    return require(next((c for c in candidates if c.is_file()), candidates[0]), made_by)


def canonical_buffers(state: dict[str, torch.Tensor], fresh: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Give fixed buffers (e.g. the mel filterbank) the exact values the model constructor makes.

    ESPnet's checkpoint averaging also averages such buffers, which can move
    them by a rounding error; restoring the constructor's values lets the NF4
    file leave them out (see :func:`rebuilt_buffers`). Parameters and buffers
    that training changed (BatchNorm statistics) are never touched.
    """
    params = {n for n, _ in fresh.named_parameters()}
    out = dict(state)
    for key, value in fresh.state_dict().items():
        old = state.get(key)
        if key in params or old is None or old.shape != value.shape or torch.equal(old, value.to(old.dtype)):
            continue
        if old.is_floating_point() and torch.allclose(old, value.to(old.dtype), rtol=1e-5, atol=1e-7):
            out[key] = value.to(old.dtype)
            logging.info(f"buffer {key}: restored the constructor's exact values (differed by rounding)")
    return out


def _resolved_config(fp_dir: Path) -> Path:
    """Return a config whose stats and sentencepiece paths are absolute (ESPnet reads them relative to the cwd)."""
    args = yaml.safe_load(require(fp_dir / "config.yaml", FP_MADE_BY).read_text(encoding="utf-8"))
    stats = (args.get("normalize_conf") or {}).get("stats_file")
    if stats and not Path(stats).is_absolute():
        args["normalize_conf"]["stats_file"] = str((fp_dir / stats).resolve())
    if args.get("bpemodel") and not Path(args["bpemodel"]).is_absolute():
        args["bpemodel"] = str((fp_dir / args["bpemodel"]).resolve())
    resolved = fp_dir / ".config.resolved.yaml"
    if not resolved.exists() or resolved.read_text(encoding="utf-8") != yaml.safe_dump(args, sort_keys=False):
        with atomic_path(resolved) as tmp:
            tmp.write_text(yaml.safe_dump(args, sort_keys=False), encoding="utf-8")
    return resolved


def token_encoder(fp_dir: Path) -> TokenEncoder:
    """Text -> token ids exactly as the model in ``fp_dir`` was trained (its config's token list and type)."""
    args = yaml.safe_load(_resolved_config(fp_dir).read_text(encoding="utf-8"))
    token_type = args.get("token_type", "word")
    bpemodel = None
    if token_type == "bpe":
        if not args.get("bpemodel"):
            raise BadInput(f"{fp_dir}/config.yaml: token_type bpe but no bpemodel; rerun {FP_MADE_BY}")
        bpemodel = require(Path(args["bpemodel"]), FP_MADE_BY)
    return TokenEncoder(list(args["token_list"]), token_type, bpemodel)


def build_speech2text(fp_dir: Path, device: str = "cpu", **decode_opts):
    """ESPnet's ``Speech2Text`` (beam search) on the full-precision model in ``fp_dir``."""
    from espnet2.bin.asr_inference import Speech2Text

    s2t = Speech2Text(asr_train_config=str(_resolved_config(fp_dir)), asr_model_file=None, device=device, **decode_opts)
    state = load_file(str(require(fp_dir / "model.safetensors", FP_MADE_BY)), device=device)
    s2t.asr_model.load_state_dict(state, strict=True)
    s2t.asr_model.eval()
    return s2t


class TokenMaskedLoss(torch.nn.Module):
    """ESPnet's attention loss (the model's ``criterion_att``) with two additions for pseudo-labels: the target
    tokens a batch's ``token_mask`` marks 0 are left out of it (STAR-style masking: the decoder still reads them),
    and it keeps the last batch's decoder output and targets, of which :meth:`log_probs` gives each target
    token's log-probability (eos last) on request, off training's path."""

    def __init__(self, loss: torch.nn.Module) -> None:
        super().__init__()
        self.loss = loss
        self.mask: torch.Tensor | None = None  # set from the batch before each forward (:func:`learn_token_masks`)
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None

    def log_probs(self) -> torch.Tensor:
        """(batch, tokens + eos): the log-probability of each target token of the last batch."""
        x, target = self.last
        return torch.log_softmax(x, dim=-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.last = (x.detach(), target)
        if self.mask is not None:  # (batch, tokens) against (batch, tokens + eos): eos is always learnt
            keep = torch.ones_like(target, dtype=torch.bool)
            keep[:, : self.mask.shape[1]] = self.mask.to(target.device)
            target = target.masked_fill(~keep, self.loss.padding_idx)
        return self.loss(x, target)


class WholeUtteranceCTC(torch.nn.Module):
    """ESPnet's CTC loss function (the model's ``ctc.ctc_loss``, one loss an utterance) with the utterances that
    have a masked token left out (``keep``): CTC aligns the whole target, so it learns an utterance or not."""

    def __init__(self, loss: torch.nn.Module) -> None:
        super().__init__()
        self.loss = loss
        self.keep: torch.Tensor | None = None

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        loss = self.loss(*args)
        return loss if self.keep is None else loss * self.keep.to(loss)


def learn_token_masks(model: torch.nn.Module) -> None:
    """Make ``model``'s forward take a ``token_mask`` (:func:`pqm.batches.token_masks`): the masked tokens leave
    the attention loss (:class:`TokenMaskedLoss`), their utterances the CTC loss (:class:`WholeUtteranceCTC`, where
    ESPnet's CTC loss is one an utterance); ESPnet's forward passes unknown keywords by."""
    model.criterion_att = TokenMaskedLoss(model.criterion_att)
    ctc = getattr(model, "ctc", None)
    per_utterance = ctc is not None and getattr(ctc.ctc_loss, "reduction", None) == "none"
    if per_utterance:
        ctc.ctc_loss = WholeUtteranceCTC(ctc.ctc_loss)

    def take_mask(module, args, kwargs):
        mask = kwargs.get(TOKEN_MASK)
        module.criterion_att.mask = mask
        if per_utterance:
            module.ctc.ctc_loss.keep = mask.all(dim=1).float() if mask is not None else None

    model.register_forward_pre_hook(take_mask, with_kwargs=True)


class TokenBias(BatchScorerInterface):
    """A fixed score per token (one vector over the token list), added at every step of ESPnet's beam search
    as one more of its scorers (as its ``LengthBonus`` adds one score to every token)."""

    def __init__(self, scores: torch.Tensor) -> None:
        self.scores = scores

    def score(self, y, state, x):
        return self.scores.to(x.device, x.dtype), None

    def batch_score(self, ys, states, xs):
        return self.scores.to(xs.device, xs.dtype).expand(ys.shape[0], -1), None


class EspnetRecognizer:
    """ESPnet's beam search (``Speech2Text``) on ``self.model``, which is quantised and adapted in place."""

    def __init__(self, fp_dir: Path, device: str = "cpu", beam_size: int = 4, ctc_weight: float = 0.5) -> None:
        self.s2t = build_speech2text(fp_dir, device=device, beam_size=beam_size, ctc_weight=ctc_weight, nbest=1)
        self.model = self.s2t.asr_model
        learn_token_masks(self.model)

    def set_window(self, window: str) -> None:
        """Whole utterances, whatever the window: only Whisper pads its input to a window."""

    def tokens(self, text: str) -> list[str]:
        """``text`` as the model's tokens (its tokenizer's: words, or sentencepiece pieces)."""
        return self.s2t.tokenizer.text2tokens(text)

    def set_token_bias(self, bias: dict[str, float]) -> None:
        """From now on add ``bias[token]`` to that token's score at every step of the beam search (``{}``: no
        bias); tokens outside the model's token list are ignored."""
        search = self.s2t.beam_search
        for table in (search.scorers, search.full_scorers, search.weights):
            table.pop("token_bias", None)
        if bias:
            scorer = TokenBias(torch.tensor([bias.get(token, 0.0) for token in search.token_list]))
            search.scorers["token_bias"] = search.full_scorers["token_bias"] = scorer
            search.weights["token_bias"] = 1.0

    def inputs(self, cuts) -> dict[str, torch.Tensor]:
        """The encoder's input of the cuts, one batch: ``speech`` and ``speech_lengths`` (16 kHz)."""
        speech, lengths = collate_audio(CutSet.from_cuts(at_16k(cuts)))
        return {"speech": speech, "speech_lengths": lengths}

    def transcribe(self, cuts, desc: str, max_new_tokens: int | None = None,
                   tokens_per_second: float = 0.0, adapters: list[str | dict[str, float]] | None = None
                   ) -> dict[str, str]:
        """Return ``{utterance id: best hypothesis}`` (the beam search ends by itself: no token limit).
        ``adapters``: the loaded LoRA adapter of each cut, or its weights over loaded adapters
        (:class:`pqm.lora.RowAdapters`)."""
        hyps = {}
        from pqm.lora import per_row  # peft and bitsandbytes: loaded to decode, not to look a family up

        with torch.no_grad(), per_row(self.model, adapters) as rows:
            for k, cut in enumerate(tqdm(at_16k(cuts), desc=desc, unit="utt", mininterval=5)):
                if rows is not None:
                    rows.names = [adapters[k]]  # one utterance at a time: its beams share its adapter
                nbest = self.s2t(torch.from_numpy(cut.load_audio()[0]))
                hyps[cut.id] = nbest[0][0] if nbest else ""
        return hyps


def encoder_mean(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each utterance's encoder output averaged over its frames, (utterances, dim); ``batch`` holds
    ``speech`` and ``speech_lengths`` (any other keys are ignored)."""
    encoded, lengths = model.encode(batch["speech"], batch["speech_lengths"])
    mask = (torch.arange(encoded.shape[1], device=encoded.device)[None] < lengths[:, None]).unsqueeze(-1)
    return (encoded * mask).sum(1) / mask.sum(1)


def build_model(fp_dir: Path, device: str = "cpu", load_weights: bool = True) -> torch.nn.Module:
    """The full-precision ESPnet model in ``fp_dir`` (for training and quantisation)."""
    from espnet2.tasks.asr import ASRTask

    args = yaml.safe_load(_resolved_config(fp_dir).read_text(encoding="utf-8"))
    model = ASRTask.build_model(argparse.Namespace(**args))
    if load_weights:
        model.load_state_dict(load_file(str(require(fp_dir / "model.safetensors", FP_MADE_BY))), strict=True)
    return model.to(device)


def omitted_keys(fp_dir: Path, model: torch.nn.Module) -> set[str]:
    """Buffers the NF4 file can leave out: building the model from its config reproduces them exactly."""
    fresh = build_model(fp_dir, load_weights=False)
    fresh_state = fresh.state_dict()
    params = {n for n, _ in model.named_parameters()}
    return {
        k
        for k, v in model.state_dict().items()
        if k not in params and k in fresh_state and fresh_state[k].shape == v.shape and torch.equal(fresh_state[k], v)
    }


# Norms, biases, the first convolution and the rest NF4 leaves alone are stored as float16: on the digit recipe
# (600 words) no hypothesis of nf4, nf4_sat, nf4_sa or pqm changed, and the file went from 7.05x to 7.30x smaller.
UNQUANTISED_DTYPE = "float16"

# SAT (and saml's experts and router) on every training utterance at speeds 0.9, 1.0 and 1.1 (run.sh's
# --sat-speed-perturb family): a Conformer trained on a few voices hears a new one better for it. On the digit
# task (egs/fsdd/README.md) nf4_sat went from 292 to 187 errors of 600 words, both test speakers, at 3x SAT's time.
SAT_SPEED_PERTURB = "0.9 1.0 1.1"


def keep_full_precision(embeddings: bool = False) -> list[str]:
    """Every Linear and large convolution is quantised (``pqm.nf4``): nothing to keep."""
    return []


def embedding_modules() -> list[str]:
    """No option to quantise embeddings (the Conformer's are small)."""
    return []


def batch_iterator(fp_dir: Path, window: str = "padded"):
    """``iterate(cuts, batch_size, epoch, seed, rank, world_size, max_duration)``: ESPnet's forward arguments
    (whole utterances: ``window`` applies to Whisper only)."""
    tokenizer = token_encoder(fp_dir)

    def iterate(cuts: CutSet, batch_size: int, epoch: int = 0, seed: int = 0, rank: int = 0, world_size: int = 1,
                max_duration: float = 0.0):
        return iterate_batches(cuts, tokenizer, batch_size, epoch=epoch, seed=seed, rank=rank, world_size=world_size,
                               max_duration=max_duration)

    return iterate


def token_loss(loss: torch.Tensor, batch: dict[str, torch.Tensor]) -> float:
    """ESPnet's loss (CTC and attention) is summed over the target's tokens: divided by their number."""
    return float(loss) / max(1, int(batch["text_lengths"].sum()))


def token_probs(model: torch.nn.Module, output: tuple, batch: dict[str, torch.Tensor]) -> list[float]:
    """The attention decoder's probability of each target token of a batch of one (teacher-forced, as the
    forward that gave ``output`` ran: the tokens a ``token_mask`` covers, eos left out)."""
    loss = next(m for m in model.modules() if isinstance(m, TokenMaskedLoss))
    return loss.log_probs()[0, : int(batch["text_lengths"][0])].exp().tolist()


def recognizer(fp_dir: Path, device: str, beam_size: int, ctc_weight: float) -> EspnetRecognizer:
    return EspnetRecognizer(fp_dir, device=device, beam_size=beam_size, ctc_weight=ctc_weight)


def text_normaliser(fp_dir: Path | None = None, split_digits: bool = True):
    """Scoring compares words as they are, apart from spacing (the Conformer writes digits as its tokens do)."""
    return lambda text: " ".join(text.split())


class _QuietBeamSearch(logging.Filter):
    """Drop ESPnet's per-utterance INFO lines (beam search details) from the decoding log."""

    NOISY = ("beam_search", "batch_beam_search", "asr_inference")

    def filter(self, entry: logging.LogRecord) -> bool:
        return entry.levelno > logging.INFO or entry.module not in self.NOISY


def log_filter() -> logging.Filter:
    return _QuietBeamSearch()


PRETRAINED_CHECKPOINTS = ("model.safetensors", "valid.acc.ave.pth", "valid.acc.ave_10best.pth", "valid.acc.best.pth",
                          "model.pth")


def pretrained_files(folder: Path) -> tuple[Path, Path]:
    """(``config.yaml``, the first checkpoint of :data:`PRETRAINED_CHECKPOINTS`) of an ESPnet model folder."""
    if not folder.is_dir():
        raise BadInput(f"--pretrained {folder}: no such folder")
    checkpoints = [folder / name for name in PRETRAINED_CHECKPOINTS if (folder / name).is_file()]
    if not checkpoints:
        raise BadInput(f"--pretrained {folder}: no {', '.join(PRETRAINED_CHECKPOINTS)} in it")
    if not (folder / "config.yaml").is_file():
        raise BadInput(f"--pretrained {folder}: no config.yaml (ESPnet's training config) in it")
    return folder / "config.yaml", checkpoints[0]


def check(a: argparse.Namespace) -> None:
    """Before anything is written: a ``--pretrained`` folder has a config and a checkpoint."""
    if a.pretrained:
        pretrained_files(Path(a.pretrained))


def prepare(a: argparse.Namespace) -> None:
    """Stage 3: Kaldi data dirs, token list and ESPnet's feature statistics (nothing for ``--pretrained``)."""
    if a.pretrained:
        logging.info(f"--pretrained {a.pretrained} brings its own tokens and feature statistics: nothing to prepare")
        return
    from pqm.espnet_data import write_espnet_data
    from pqm.train_conformer import collect_stats

    write_espnet_data(a.datadir, a.corpus, a.token_type, a.nbpe)
    collect_stats(a)


def train(a: argparse.Namespace) -> None:
    """Stage 4: train with ESPnet's trainer (or take ``--pretrained``) and export to ``<expdir>/fp``."""
    if a.pretrained:
        config, checkpoint = pretrained_files(Path(a.pretrained))
    else:
        from pqm.train_conformer import train as train_conformer

        config, checkpoint = train_conformer(a)
    export_fp_model(config, checkpoint, a.expdir / "fp")

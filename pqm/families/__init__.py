"""Model families: one module each, behind one interface, and a registry of them.

A family module (``pqm/families/<module>.py``) holds everything the stages
need to know about one kind of model, as module-level names:

- ``check(a)``, ``prepare(a)``, ``train(a)``: the option check before anything
  is written, stage 3 (the family's data) and stage 4 (write ``<expdir>/fp``,
  recording the family there with :func:`record`), run by
  ``python -m pqm.families {check,prepare,train} --model NAME ...``;
- ``build_model(fp_dir, device)``: the full-precision model;
- ``omitted_keys(fp_dir, model)``: state-dict keys the NF4 file can leave out;
- ``keep_full_precision(embeddings)``: modules NF4 leaves alone;
- ``embedding_modules()``: token embeddings ``--nf4-embeddings true`` quantises
  (``[]`` where there is no such option);
- ``UNQUANTISED_DTYPE``: how the NF4 file stores what stays in full precision unless
  ``--nf4-unquantised-dtype`` says (float16 where that was measured to change no hypothesis);
- ``SAT_SPEED_PERTURB``: the speed factors of stage 6's training data unless ``--sat-speed-perturb`` says
  (``""``: none);
- ``DEFAULT_TARGETS``: the LoRA target modules (a regex);
- ``batch_iterator(fp_dir, window)``: LoRA training batches;
- ``token_loss(loss, batch)``: the training loss of a batch of one per target token (pseudo-label confidence);
- ``token_probs(model, output, batch)``: the probability of each target token of a batch of one, from its
  forward's ``output``; the batch iterator takes the same tokens' ``token_mask`` (:mod:`pqm.batches`);
- ``encoder_mean(model, batch)``: each utterance's mean encoder output (``saml``'s router reads it);
- ``recognizer(fp_dir, device, beam_size, ctc_weight)``: decoding (``transcribe(cuts, ...)``), and
  ``inputs(cuts)``: the encoder's input of cuts, one batch; where the family's decoding can be biased (ESPnet),
  also ``tokens(text)`` and ``set_token_bias(bias)`` (``pqm_unsup``'s token prior, :mod:`pqm.pseudo_labels`);
- ``DECODING``: decoding settings fixed by the family (part of stage 8's run key);
- ``text_normaliser(fp_dir, split_digits)``: scoring normalisation (``split_digits``: the corpus's rule);
- ``log_filter()``: a logging filter for the decoding log, or None.

To add a family: write its module and add one line to :data:`FAMILIES`.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
from pathlib import Path
from types import ModuleType

from pqm.errors import BadInput, MissingInput
from pqm.files import read_json, write_json

FAMILIES = {  # --model name -> module
    "conformer": "pqm.families.espnet",
    "whisper": "pqm.families.whisper",
}
FAMILY_FILE = "family.json"


def record(fp_dir: Path, name: str) -> None:
    """Stage 4: say in the model folder which family made it, and on what machine (a model trained on
    another CPU can come out different: egs/fsdd/README.md, "The same command on another machine")."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}")
    write_json(fp_dir / FAMILY_FILE, {"family": name, "made_on": machine()})


def machine() -> dict:
    """This machine as far as it can change a trained model: the CPU model, its cores, the torch build."""
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text(errors="replace").splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__}


def made_on(fp_dir: Path) -> dict | None:
    """The machine stage 4 recorded in ``fp_dir`` (None where it was not recorded, or there is no record)."""
    path = Path(fp_dir) / FAMILY_FILE
    return read_json(path).get("made_on") if path.is_file() else None


def family_of(fp_dir: Path) -> str:
    """The family name stage 4 recorded in ``fp_dir``."""
    path = Path(fp_dir) / FAMILY_FILE
    if not Path(fp_dir).is_dir():
        raise MissingInput(f"missing {fp_dir}: it is made by stage 4 (train or load the model)")
    if not path.is_file():
        raise BadInput(f"{path} is missing: {fp_dir} was not made by stage 4 of this version "
                       "(rerun stage 4: ./run.sh --stage 4 with the options you ran with)")
    try:
        name = read_json(path).get("family")
    except (json.JSONDecodeError, AttributeError) as err:
        raise BadInput(f"{path} is damaged ({err!r}): rerun stage 4") from None
    if name not in FAMILIES:
        raise BadInput(f"{path}: unknown model family {name!r} (known: {', '.join(FAMILIES)})")
    return name


def family(name_or_fp_dir: str | Path) -> ModuleType:
    """The family module of a name (``--model``) or of a model folder made by stage 4."""
    name = name_or_fp_dir if isinstance(name_or_fp_dir, str) else family_of(name_or_fp_dir)
    if name not in FAMILIES:
        raise BadInput(f"unknown model family {name!r} (known: {', '.join(FAMILIES)})")
    return importlib.import_module(FAMILIES[name])

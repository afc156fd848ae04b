"""NF4 quantisation of a PyTorch model with bitsandbytes, and the NF4 file format.

Every ``nn.Linear`` becomes ``bnb.nn.Linear4bit``; every ``nn.Conv1d``/``nn.Conv2d``
holding at least ``min_conv_numel`` weights (in the default Conformer: the
pointwise 1x1, depthwise and second subsampling convolutions) becomes :class:`Conv4bit`, which
keeps the same NF4 ``Params4bit`` storage and dequantises it with bitsandbytes
for each forward. Small convolutions (depthwise, first subsampling layer),
norms, biases and embeddings stay in full precision: float32, or float16 in the
file with ``unquantised_dtype="float16"`` (the model then holds the float16
values as float32, so that what is saved is what was fingerprinted).

An NF4 model is saved (:func:`save_nf4`) as ``nf4.json`` and a safetensors file
of its state dict: bitsandbytes' packed 4-bit weights and quantisation state
(see :func:`compact_state_dict`), all tensors of one dtype concatenated into
one (see :func:`pack_by_dtype`). It is loaded back onto a freshly built
full-precision model (:func:`to_nf4`), which is quantised first: that model's
own state dict names the tensors and gives their shapes, and
:func:`load_nf4_state_dict` rebuilds each ``Params4bit`` with
``Params4bit.from_prequantized``. The same code serves every model family.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import bitsandbytes as bnb
import torch
import torch.nn.functional as F
from bitsandbytes.functional import QuantState
from bitsandbytes.nn import Params4bit
from bitsandbytes.utils import unpack_tensor_to_dict
from safetensors.torch import load_file, save_file
from torch import nn

from pqm.errors import BadInput, require
from pqm.files import atomic_path, read_json, write_json


@dataclass
class NF4Config:
    """What to quantise and how."""

    blocksize: int = 64
    double_quant: bool = True
    min_conv_numel: int = 2048
    keep_fp: list[str] = field(default_factory=list)  # module names left in full precision
    embeddings: list[str] = field(default_factory=list)  # nn.Embedding modules to quantise too (and Linears tied to them)
    unquantised_dtype: str = "float32"  # how the file stores the tensors left in full precision: float32 or float16


class Conv4bit(nn.Module):
    """A Conv1d/Conv2d whose weight is stored in NF4 by bitsandbytes."""

    def __init__(self, conv: nn.Conv1d | nn.Conv2d, cfg: NF4Config, device: str = "cpu") -> None:
        super().__init__()
        self.kind = "conv1d" if isinstance(conv, nn.Conv1d) else "conv2d"
        self.weight_shape = tuple(conv.weight.shape)
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        if conv.padding_mode != "zeros":
            raise ValueError(f"Conv4bit supports zero padding only, got {conv.padding_mode}")
        flat = conv.weight.data.reshape(self.weight_shape[0], -1).contiguous()
        self.weight = Params4bit(
            flat,
            requires_grad=False,
            blocksize=cfg.blocksize,
            compress_statistics=cfg.double_quant,
            quant_type="nf4",
        ).to(device)
        self.bias = conv.bias

    def dequantized_weight(self) -> torch.Tensor:
        """The full-precision weight reconstructed from NF4."""
        w = bnb.functional.dequantize_4bit(self.weight.data, self.weight.quant_state)
        return w.reshape(self.weight_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = F.conv1d if self.kind == "conv1d" else F.conv2d
        w = self.dequantized_weight().to(x.dtype)
        return conv(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: D102
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for k, v in self.weight.quant_state.as_dict(packed=True).items():
            destination[prefix + "weight." + k] = v if keep_vars else v.detach()

    def extra_repr(self) -> str:
        return f"{self.kind}, weight_shape={self.weight_shape}, nf4"


class SavableEmbedding4bit(bnb.nn.Embedding4bit):
    """bitsandbytes' NF4 embedding, with the state dict saving it lacks (as Linear4bit saves), and
    double quantisation, which its row lookup lacks."""

    def _forward_with_partial_dequantize(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (bnb's name)
        state = self.weight.quant_state
        if not state.nested:
            return super()._forward_with_partial_dequantize(input)
        # bitsandbytes looks up each row's block scales (absmax); with double quantisation those are
        # themselves 8-bit codes, so they are expanded first, as dequantize_4bit does for a whole weight
        absmax = (bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset).float()
        blocks = absmax.view(self.num_embeddings, self.embedding_dim // state.blocksize)
        rows = self.weight.data.view(torch.uint8).view(self.num_embeddings, self.embedding_dim // 2)
        looked_up = QuantState(absmax=F.embedding(input, blocks).reshape(-1),
                               shape=torch.Size((*input.shape, self.embedding_dim)), code=state.code,
                               blocksize=state.blocksize, quant_type=state.quant_type, dtype=state.dtype)
        return bnb.functional.dequantize_4bit(F.embedding(input, rows).reshape(-1, 1), looked_up).to(self.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: D102
        nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)
        for k, v in self.weight.quant_state.as_dict(packed=True).items():
            destination[prefix + "weight." + k] = v if keep_vars else v.detach()


def _embedding4bit(emb: nn.Embedding, cfg: NF4Config, device: str) -> SavableEmbedding4bit:
    """NF4 embedding, block-wise, with double quantisation as ``cfg`` says."""
    q = SavableEmbedding4bit(emb.num_embeddings, emb.embedding_dim, quant_type="nf4", device="meta")
    q.dtype = emb.weight.dtype
    q.weight = Params4bit(
        emb.weight.data.contiguous(), requires_grad=False, blocksize=cfg.blocksize, compress_statistics=cfg.double_quant,
        quant_type="nf4", module=q,
    ).to(device)
    return q


def _tied_linear4bit(linear: nn.Linear, weight: Params4bit) -> bnb.nn.Linear4bit:
    """A Linear4bit that shares an NF4 embedding's weight (an output projection tied to the embedding)."""
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=torch.float32, quant_type="nf4", device="meta")
    q.weight = weight
    q.bias = linear.bias
    return q


def _linear4bit(linear: nn.Linear, cfg: NF4Config, device: str) -> bnb.nn.Linear4bit:
    q = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=torch.float32,
        compress_statistics=cfg.double_quant,
        quant_type="nf4",
        device="meta",
    )
    q.weight = Params4bit(
        linear.weight.data.contiguous(),
        requires_grad=False,
        blocksize=cfg.blocksize,
        compress_statistics=cfg.double_quant,
        quant_type="nf4",
        module=q,
    ).to(device)
    q.bias = linear.bias
    return q


def quantize_model(model: nn.Module, cfg: NF4Config | None = None, device: str = "cpu") -> list[str]:
    """Replace Linear and large Conv layers of ``model`` in place by NF4 ones.

    The model object and its sub-module objects keep their identity (only
    leaves are swapped), so a beam search holding references keeps working.
    Returns the names of the quantised modules.
    """
    cfg = cfg or NF4Config()
    done, shared = [], {}  # shared: id of an embedding's fp weight -> its NF4 weight
    for name in cfg.embeddings:
        emb = model.get_submodule(name)
        if not isinstance(emb, nn.Embedding):
            raise ValueError(f"{name} is not an nn.Embedding")
        q = _embedding4bit(emb, cfg, device)
        shared[id(emb.weight)] = q.weight
        parent, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child_name, q)
        done.append(name)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if full in cfg.keep_fp:
                continue
            if isinstance(child, nn.Linear) and id(child.weight) in shared:
                setattr(module, child_name, _tied_linear4bit(child, shared[id(child.weight)]))
            elif isinstance(child, nn.Linear) and not isinstance(child, bnb.nn.Linear4bit):
                setattr(module, child_name, _linear4bit(child, cfg, device))
            elif isinstance(child, (nn.Conv1d, nn.Conv2d)) and child.weight.numel() >= cfg.min_conv_numel:
                setattr(module, child_name, Conv4bit(child, cfg, device))
            else:
                continue
            done.append(full)
    disable_cpu_repack(model)
    model.is_loaded_in_4bit = True  # tells peft to use its bitsandbytes LoRA layers
    logging.info(f"quantised {len(done)} modules to NF4 (block size {cfg.blocksize}, double quant {cfg.double_quant})")
    return done


def disable_cpu_repack(model: nn.Module) -> None:
    """Turn off bitsandbytes' in-place AVX512-BF16 weight repacking on CPU.

    With it on, the first eval-mode no-grad forward repacks the weight in place;
    training afterwards fails and ``dequantize_4bit`` (so peft's merge) returns
    garbage (see ../shared/docs/stack-notes.md).
    """
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


SHARED_PREFIX = "nf4_shared."
_SHARED_SUFFIXES = (".weight.quant_map", ".weight.nested_quant_map")
_QUANT_STATE_JSON = ".quant_state.bitsandbytes__nf4"
PACKED_PREFIX = "nf4_packed."


def compact_state_dict(state_dict: dict[str, torch.Tensor], rebuilt: set[str]) -> dict[str, torch.Tensor]:
    """Lossless space savings for the NF4 file.

    bitsandbytes stores the same NF4 code table (16 values) and double-quant
    code table (256 values) with every layer; they are kept once under
    ``nf4_shared.*`` when identical. Of the JSON it stores with every layer
    (``quant_state.bitsandbytes__nf4``: type, block sizes, dtypes, shape and the
    double quantisation's offset) only the offset depends on the weights: it is
    kept as ``<weight>.nested_offset``; loading takes the rest from the model
    (:func:`load_nf4_state_dict`). Buffers in ``rebuilt`` (those the model
    constructor recomputes from its config, e.g. the mel filterbank) are left out.
    """
    out, shared = {}, {}
    for key, value in state_dict.items():
        if key in rebuilt or key.rsplit(".weight.", 1)[0] + ".weight" in rebuilt:  # with a tied weight's quant state
            continue
        if key.endswith(_QUANT_STATE_JSON):
            offset = unpack_tensor_to_dict(value).get("nested_offset")
            if offset is not None:
                out[key[: -len(_QUANT_STATE_JSON)] + ".nested_offset"] = torch.tensor(offset, dtype=torch.float32)
            continue
        suffix = next((s for s in _SHARED_SUFFIXES if key.endswith(s)), None)
        if suffix is not None:
            name = SHARED_PREFIX + suffix.rsplit(".", 1)[-1]
            if name not in shared:
                shared[name] = value
            if torch.equal(shared[name], value):
                continue
        out[key] = value.detach().contiguous()
    out.update({k: v.detach().contiguous() for k, v in shared.items()})
    return out


def pack_by_dtype(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of ``state``, flattened and concatenated in key order, one tensor per dtype.

    A safetensors header names, types and places every tensor (about 110
    bytes each: 50 kB for the digit recipe's Conformer, 3% of its NF4 file); a
    few packed tensors need a few. Their names and shapes are those of the
    model's own state dict (:func:`unpack_by_dtype`)."""
    groups: dict[str, list[torch.Tensor]] = {}
    for key in sorted(state):
        groups.setdefault(PACKED_PREFIX + _dtype_name(state[key].dtype), []).append(state[key].reshape(-1))
    return {name: torch.cat(parts) for name, parts in groups.items()}


def unpack_by_dtype(packed: dict[str, torch.Tensor], layout: dict[str, tuple[torch.dtype, torch.Size]],
                    source: Path) -> dict[str, torch.Tensor]:
    """Undo :func:`pack_by_dtype` given each tensor's name, dtype and shape; ``source`` names the file in errors."""
    start = dict.fromkeys(packed, 0)
    out = {}
    for key in sorted(layout):
        dtype, shape = layout[key]
        name, n = PACKED_PREFIX + _dtype_name(dtype), shape.numel()
        if name not in packed or start[name] + n > packed[name].numel():
            raise BadInput(f"{source} holds fewer {_dtype_name(dtype)} values than the model needs: it was written "
                           f"for another model (or pqm version); rerun stage 5")
        out[key] = packed[name][start[name]: start[name] + n].view(shape)
        start[name] += n
    left = {name: packed[name].numel() - used for name, used in start.items() if used != packed[name].numel()}
    if left:
        raise BadInput(f"{source} holds more values than the model needs ({left}): it was written for another "
                       f"model (or pqm version); rerun stage 5")
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _settings(state: QuantState) -> dict:
    """What a quantisation state holds beyond its tensors and offset: type, block sizes, dtypes, shape."""
    return {k: v for k, v in state.as_dict().items() if not isinstance(v, torch.Tensor) and k != "nested_offset"}


def _expand_shared(state_dict: dict[str, torch.Tensor], prefix: str, stats: dict[str, torch.Tensor]) -> None:
    """Put the shared code tables back into one layer's quantisation state."""
    if "quant_map" not in stats and SHARED_PREFIX + "quant_map" in state_dict:
        stats["quant_map"] = state_dict[SHARED_PREFIX + "quant_map"]
    if "nested_absmax" in stats and "nested_quant_map" not in stats:
        stats["nested_quant_map"] = state_dict[SHARED_PREFIX + "nested_quant_map"]


def load_nf4_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], device: str = "cpu", rebuilt: set[str] = frozenset()
) -> None:
    """Load a state dict saved from an NF4 model into an NF4 model of the same structure.

    ``model`` must already have the same quantised layout (see :func:`quantize_model`);
    keys in ``rebuilt`` may be absent (the model already holds them). Each layer's
    quantisation state is bitsandbytes' own (with its JSON) or compact (with just
    ``nested_offset``, see :func:`compact_state_dict`).
    Raises if any other key is missing or left over.
    """
    state_dict = dict(state_dict)
    loaded: dict[int, Params4bit] = {}  # a weight shared by several modules (tied) is loaded once
    for name, module in model.named_modules():
        if isinstance(module, (bnb.nn.Linear4bit, Conv4bit, bnb.nn.Embedding4bit)):
            if id(module.weight) in loaded:
                module.weight = loaded[id(module.weight)]
                continue
            prefix = f"{name}.weight"
            if prefix not in state_dict:
                raise KeyError(f"NF4 weight {prefix} missing from the state dict")
            data = state_dict.pop(prefix)
            stats = {k[len(prefix) + 1 :]: state_dict.pop(k) for k in list(state_dict) if k.startswith(prefix + ".")}
            _expand_shared(state_dict, prefix, stats)
            if not any(k.startswith("quant_state.") for k in stats):  # saved compact: the rest is the model's
                stats.update(_settings(module.weight.quant_state))
            owner = module if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Embedding4bit)) else None
            old_id = id(module.weight)
            module.weight = Params4bit.from_prequantized(data, stats, device=device, module=owner)
            loaded[old_id] = module.weight
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(SHARED_PREFIX)}
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    quantised = {f"{n}.weight" for n, m in model.named_modules()
                 if isinstance(m, (bnb.nn.Linear4bit, Conv4bit, bnb.nn.Embedding4bit))}
    missing = [k for k in missing if k not in quantised and k not in rebuilt]
    if missing or unexpected:
        raise KeyError(f"NF4 state dict does not match the model: missing {missing}, unexpected {unexpected}")
    disable_cpu_repack(model)


def fingerprint(model: nn.Module) -> str:
    """SHA-256 of a model's state dict (names, shapes and values).

    Floating-point tensors are hashed as float32, so a model cast to float32
    for decoding (ESPnet's ``Speech2Text`` does that) keeps its fingerprint.
    """
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        t = value.detach().cpu().contiguous()
        if t.is_floating_point():
            t = t.float()
        h.update(f"{key}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def count_params(model: nn.Module) -> int:
    """Number of parameters of a full-precision model."""
    return sum(p.numel() for p in model.parameters())


NF4_MADE_BY = "stage 5 (NF4 quantisation)"


def _nf4_part(key: str, quantised: set[str]) -> str | None:
    """What an NF4 file's tensor ``key`` is: ``"weights"`` or ``"state"`` of a module in ``quantised``,
    or None for a tensor left in full precision."""
    if key.startswith(SHARED_PREFIX) or key.partition(".weight.")[0] in quantised:
        return "state"
    if key.endswith(".weight") and key[: -len(".weight")] in quantised:
        return "weights"
    return None


def size_breakdown(model: nn.Module, state: dict[str, torch.Tensor], modules: list[str]) -> dict[str, int]:
    """Bytes of the NF4 file's tensors by what they hold: the 4-bit weights of ``modules``, their
    quantisation state, and the tensors left in full precision by module type and tensor name."""
    quantised = set(modules)
    out: dict[str, int] = {}
    for key, value in state.items():
        part = _nf4_part(key, quantised)
        if part == "state":
            what = "4-bit quantisation state (absmax, code tables)"
        elif part == "weights":
            what = "4-bit weights"
        else:
            owner, _, name = key.rpartition(".")
            what = f"full precision: {type(model.get_submodule(owner)).__name__}.{name}"
        out[what] = out.get(what, 0) + value.numel() * value.element_size()
    return dict(sorted(out.items(), key=lambda item: -item[1]))


def save_nf4(model: nn.Module, cfg: NF4Config, modules: list[str], out_dir: Path, omitted: set[str]) -> str:
    """Save an NF4 model as ``out_dir/{model.safetensors,nf4.json}``; return its fingerprint.

    ``omitted``: state-dict keys the model's family rebuilds (or ties) by itself.
    """
    state = compact_state_dict(model.state_dict(keep_vars=True), omitted)
    if cfg.unquantised_dtype == "float16":
        state = _unquantised_to_float16(model, state, set(modules))
    elif cfg.unquantised_dtype != "float32":
        raise ValueError(f"unquantised_dtype {cfg.unquantised_dtype!r}: use float32 or float16")
    # the file's layout must not depend on the dtypes a model holds at run time (ESPnet casts float64 buffers to
    # float32 for decoding): what is not stored as unquantised_dtype says so
    stored = {key: _dtype_name(value.dtype) for key, value in state.items()
              if _full_precision_float(key, value, set(modules)) and _dtype_name(value.dtype) != cfg.unquantised_dtype}
    base_fingerprint = fingerprint(model)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        save_file(pack_by_dtype(state), str(tmp / "model.safetensors"))
        write_json(tmp / "nf4.json", {"config": vars(cfg), "modules": modules, "rebuilt_buffers": sorted(omitted),
                                      "stored_dtypes": stored, "fingerprint": base_fingerprint,
                                      "size_breakdown_bytes": size_breakdown(model, state, modules)})
    return base_fingerprint


def _full_precision_float(key: str, value: torch.Tensor, quantised: set[str]) -> bool:
    return value.is_floating_point() and not _nf4_part(key, quantised)


def _unquantised_to_float16(model: nn.Module, state: dict[str, torch.Tensor], quantised: set[str]
                            ) -> dict[str, torch.Tensor]:
    """``state`` with its float32 full-precision tensors as float16, each rounded in ``model`` too
    (the model keeps float32 tensors that hold float16 values); one that overflows float16 stays float32."""
    tensors = model.state_dict(keep_vars=True)
    out = dict(state)
    for key, value in state.items():
        if value.dtype != torch.float32 or not _full_precision_float(key, value, quantised):
            continue
        half = value.detach().half()
        if not torch.isfinite(half).all():
            logging.warning(f"{key} does not fit float16: kept float32")
            continue
        tensors[key].data.copy_(half)
        out[key] = half
    return out


def _file_layout(model: nn.Module, meta: dict) -> dict[str, tuple[torch.dtype, torch.Size]]:
    """Name, dtype and shape of every tensor :func:`save_nf4` wrote for ``model`` (quantised, not yet loaded)."""
    state = compact_state_dict(model.state_dict(), set(meta["rebuilt_buffers"]))
    default = getattr(torch, meta["config"]["unquantised_dtype"])
    quantised, stored = set(meta["modules"]), meta["stored_dtypes"]

    def dtype(key: str, value: torch.Tensor) -> torch.dtype:
        if key in stored:
            return getattr(torch, stored[key])
        return default if _full_precision_float(key, value, quantised) else value.dtype

    return {key: (dtype(key, value), value.shape) for key, value in state.items()}


def read_nf4_tensors(model: nn.Module, nf4_dir: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``nf4_dir/model.safetensors`` by name, as :func:`save_nf4` had them before packing;
    ``model`` is quantised as ``nf4.json`` says and gives the names and shapes."""
    meta = read_json(nf4_dir / "nf4.json", NF4_MADE_BY)
    file = require(nf4_dir / "model.safetensors", NF4_MADE_BY)
    state = load_file(str(file))
    if not any(key.startswith(PACKED_PREFIX) for key in state):  # a file of one tensor each (before 2026-12)
        return state
    return unpack_by_dtype(state, _file_layout(model, meta), file)


def to_nf4(model: nn.Module, nf4_dir: Path, device: str = "cpu") -> str:
    """Turn a full-precision model into the saved NF4 model of ``nf4_dir`` in place; return its fingerprint."""
    meta = read_json(nf4_dir / "nf4.json", NF4_MADE_BY)
    quantize_model(model, NF4Config(**meta["config"]), device=device)
    load_nf4_state_dict(model, read_nf4_tensors(model, nf4_dir), device=device, rebuilt=set(meta["rebuilt_buffers"]))
    base_fingerprint = fingerprint(model)
    if base_fingerprint != meta["fingerprint"]:
        raise BadInput(f"{nf4_dir}/model.safetensors does not match its nf4.json fingerprint: rerun stage 5")
    return base_fingerprint

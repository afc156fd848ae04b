"""NF4 quantisation with bitsandbytes on a real (tiny) ESPnet Conformer."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file

from pqm.families.espnet import DEFAULT_TARGETS, build_model, omitted_keys
from pqm.lora import LoraSettings, add_lora
from pqm.errors import BadInput
from pqm.nf4 import (PACKED_PREFIX, Conv4bit, NF4Config, fingerprint, quantize_model, read_nf4_tensors, save_nf4,
                     to_nf4)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    speech = torch.randn(2, 16000, generator=g) * 0.1
    lengths = torch.tensor([16000, 12000])
    return speech, lengths


def _encode(model, speech, lengths):
    with torch.no_grad():
        return model.encode(speech, lengths)[0]


def test_size_breakdown_adds_up_to_the_file(tiny_fp_dir, tmp_path):
    """Stage 5's size.json splits the NF4 file into 4-bit weights, their state, each kind of full-precision
    tensor and the safetensors header; the parts add up to the file's size."""
    import json

    from pqm.quantize import main as quantize

    quantize(["--fp-dir", str(tiny_fp_dir), "--out", str(tmp_path / "nf4")])
    report = json.loads((tmp_path / "nf4" / "size.json").read_text())
    parts = report["breakdown_bytes"]
    assert sum(parts.values()) == report["size_bytes"]["nf4"] == (tmp_path / "nf4" / "model.safetensors").stat().st_size
    assert max(parts, key=parts.get) == "4-bit weights"
    assert parts["full precision: Linear4bit.bias"] > 0 and parts["full precision: LayerNorm.weight"] > 0
    assert all(v > 0 for v in parts.values())


def test_quantize_replaces_linears_and_large_convs(tiny_fp_dir):
    model = build_model(tiny_fp_dir).eval()
    names = quantize_model(model, NF4Config(min_conv_numel=2048))
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not isinstance(m, bnb.nn.Linear4bit)]
    assert linears == [], f"Linear layers left in full precision: {linears}"
    convs = {n for n, m in model.named_modules() if isinstance(m, Conv4bit)}
    assert "encoder.encoders.0.conv_module.pointwise_conv1" in convs
    assert "encoder.embed.conv.2" in convs  # the second subsampling convolution
    assert "encoder.embed.conv.0" not in convs  # 1x64x3x3 = 576 weights: left in fp32
    assert set(names) >= convs
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            assert m.weight.quant_state.quant_type == "nf4"
            assert m.weight.quant_state.blocksize == 64
            assert m.weight.quant_state.nested  # double quantisation on by default


def test_nf4_outputs_close_to_fp_but_not_equal(tiny_fp_dir):
    fp_model = build_model(tiny_fp_dir).eval()
    nf4_model = build_model(tiny_fp_dir).eval()
    quantize_model(nf4_model)
    speech, lengths = _inputs()
    a, b = _encode(fp_model, speech, lengths), _encode(nf4_model, speech, lengths)
    rel = ((a - b).norm() / a.norm()).item()
    assert 0.001 < rel < 0.5, f"relative difference fp vs nf4 {rel}"


def test_conv4bit_matches_conv_with_dequantized_weight():
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(32, 64, 1)
    q = Conv4bit(conv, NF4Config())
    w = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).reshape(conv.weight.shape)
    x = torch.randn(2, 32, 10)
    expected = torch.nn.functional.conv1d(x, w, conv.bias)
    assert torch.allclose(q(x), expected, atol=1e-6)
    assert (w - conv.weight).abs().max() > 0  # really 4-bit
    assert (w - conv.weight).norm() / conv.weight.norm() < 0.2


def test_save_load_roundtrip_is_exact(tiny_fp_dir, tmp_path):
    model = build_model(tiny_fp_dir).eval()
    rebuilt = omitted_keys(tiny_fp_dir, model)
    cfg = NF4Config()
    modules = quantize_model(model, cfg)
    fp = save_nf4(model, cfg, modules, tmp_path / "nf4", rebuilt)
    loaded = build_model(tiny_fp_dir).eval()
    assert to_nf4(loaded, tmp_path / "nf4") == fp
    speech, lengths = _inputs(1)
    assert torch.equal(_encode(model, speech, lengths), _encode(loaded, speech, lengths))
    # one packed tensor per dtype; by name, the shared code tables once and each layer's offset without its JSON
    assert all(k.startswith(PACKED_PREFIX) for k in load_file(str(tmp_path / "nf4" / "model.safetensors")))
    keys = read_nf4_tensors(loaded, tmp_path / "nf4").keys()
    assert sum(k.endswith("quant_map") for k in keys) == 2
    assert sum(k.endswith(".weight.nested_offset") for k in keys) == len(modules)
    assert not any("quant_state" in k for k in keys)
    # NF4 file at least 5x smaller even for this tiny model with its fixed overheads
    assert (tiny_fp_dir / "model.safetensors").stat().st_size > 5 * (tmp_path / "nf4" / "model.safetensors").stat().st_size


def test_nf4_file_of_one_tensor_each_still_loads(tiny_fp_dir, tmp_path):
    """A file written before the packed format (bitsandbytes' own state dict, its JSON per layer) loads."""
    from safetensors.torch import save_file

    model = build_model(tiny_fp_dir).eval()
    rebuilt, cfg = omitted_keys(tiny_fp_dir, model), NF4Config()
    fp = save_nf4(model, cfg, quantize_model(model, cfg), tmp_path / "nf4", rebuilt)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in rebuilt}
    assert any(k.endswith(".quant_state.bitsandbytes__nf4") for k in state)
    save_file(state, str(tmp_path / "nf4" / "model.safetensors"))
    assert to_nf4(build_model(tiny_fp_dir).eval(), tmp_path / "nf4") == fp


def test_nf4_file_for_another_model_is_refused(tiny_fp_dir, tmp_path):
    """A packed file with fewer or more values than the model's layout needs names the file and stage 5."""
    from safetensors.torch import save_file

    model = build_model(tiny_fp_dir).eval()
    cfg = NF4Config()
    save_nf4(model, cfg, quantize_model(model, cfg), tmp_path / "nf4", omitted_keys(tiny_fp_dir, model))
    file = tmp_path / "nf4" / "model.safetensors"
    packed = load_file(str(file))
    weights = packed[PACKED_PREFIX + "uint8"]
    for changed in (weights[:-1], torch.cat([weights, weights[:1]])):
        save_file({**packed, PACKED_PREFIX + "uint8": changed.contiguous()}, str(file))
        with pytest.raises(BadInput, match="model.safetensors .*rerun stage 5"):
            to_nf4(build_model(tiny_fp_dir).eval(), tmp_path / "nf4")


def test_train_after_decode_on_nf4(tiny_fp_dir):
    """The bitsandbytes CPU repacking bug: an eval no-grad forward, then training."""
    model = build_model(tiny_fp_dir)
    quantize_model(model)
    before = fingerprint(model)
    lin = model.encoder.encoders[0].self_attn.linear_q
    w_before = bnb.functional.dequantize_4bit(lin.weight.data, lin.weight.quant_state).clone()
    model = add_lora(model, LoraSettings(DEFAULT_TARGETS))
    speech, lengths = _inputs()
    model.eval()
    _encode(model.base_model.model, speech, lengths)  # decode-like forward
    model.train()
    text = torch.tensor([[2, 3, 4], [5, 6, -1]])
    loss = model(speech=speech, speech_lengths=lengths, text=text, text_lengths=torch.tensor([3, 2]))[0]
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None for g in grads)
    assert model.base_model.model.encoder.encoders[0].self_attn.linear_q.base_layer is lin  # peft wrapped it
    w_after = bnb.functional.dequantize_4bit(lin.weight.data, lin.weight.quant_state)
    assert torch.equal(w_before, w_after)
    assert fingerprint(model.base_model.model) != before  # LoRA layers added to the state dict


def test_fingerprint_detects_changed_weights(tiny_fp_dir):
    a = build_model(tiny_fp_dir)
    b = build_model(tiny_fp_dir)
    assert fingerprint(a) == fingerprint(b)
    with torch.no_grad():
        b.decoder.output_layer.bias[0] += 1e-3
    assert fingerprint(a) != fingerprint(b)


@pytest.mark.parametrize("double_quant", [True, False])
def test_double_quant_option(tiny_fp_dir, double_quant):
    model = build_model(tiny_fp_dir)
    quantize_model(model, NF4Config(double_quant=double_quant))
    lin = model.encoder.encoders[0].feed_forward.w_1
    assert bool(lin.weight.quant_state.nested) == double_quant


def test_float16_storage_of_what_stays_full_precision(tiny_fp_dir, tmp_path):
    """``unquantised_dtype="float16"``: norms, biases and the rest are float16 in the file, the saved model
    holds those values, loading reproduces it exactly, and the file is smaller by half their bytes."""
    import json

    rebuilt = omitted_keys(tiny_fp_dir, build_model(tiny_fp_dir))
    sizes = {}
    for dtype in ("float32", "float16"):
        m = build_model(tiny_fp_dir).eval()
        cfg = NF4Config(unquantised_dtype=dtype)
        fp = save_nf4(m, cfg, quantize_model(m, cfg), tmp_path / dtype, rebuilt)
        sizes[dtype] = (tmp_path / dtype / "model.safetensors").stat().st_size
    loaded = build_model(tiny_fp_dir).eval()
    assert to_nf4(loaded, tmp_path / "float16") == fp  # the model saved held the float16 values
    saved = read_nf4_tensors(loaded, tmp_path / "float16")
    norm = "encoder.encoders.0.norm_ff.weight"
    assert saved[norm].dtype == torch.float16 and saved["encoder.encoders.0.feed_forward.w_1.weight"].dtype == torch.uint8
    assert torch.equal(loaded.state_dict()[norm], saved[norm].float())
    assert loaded.state_dict()[norm].dtype == torch.float32
    full = {dtype: sum(n for what, n in json.loads((tmp_path / dtype / "nf4.json").read_text())
                       ["size_breakdown_bytes"].items() if what.startswith("full precision")) for dtype in sizes}
    unquantised = sum(v.numel() for v in saved.values() if v.dtype == torch.float16)
    assert full["float32"] - full["float16"] == 2 * unquantised > 0
    assert 0 <= 2 * unquantised - (sizes["float32"] - sizes["float16"]) < 128  # the float16 file's header: one entry more


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_embedding_rows_match_its_dequantised_table(double_quant):
    """An NF4 embedding looks rows up from its 4-bit table, with or without double quantisation of the
    block scales (bitsandbytes' row lookup handles only the latter), and its tied projection shares it."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(100, 128)
    out = torch.nn.Linear(128, 100, bias=False)
    out.weight = emb.weight
    model = torch.nn.ModuleDict({"emb": emb, "out": out})
    quantize_model(model, NF4Config(embeddings=["emb"], double_quant=double_quant))
    q = model["emb"]
    assert bool(q.weight.quant_state.nested) == double_quant and model["out"].weight is q.weight
    table = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state)
    ids = torch.tensor([[3, 99, 0], [7, 7, 50]])
    assert torch.equal(q(ids), table[ids])
    assert 0 < (table - emb.weight).abs().max() < 0.25 * emb.weight.abs().max()  # 4-bit, not garbage

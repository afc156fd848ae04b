"""peft LoRA adapters on the NF4 model: format, size, fingerprint refusal."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import build_tiny_fp_dir
from pqm.families.espnet import DEFAULT_TARGETS, build_model, omitted_keys
from pqm.lora import AdapterMismatch, LoraSettings, add_lora, load_adapter, save_adapter, trainable_params
from pqm.nf4 import NF4Config, count_params, quantize_model, save_nf4, to_nf4


@pytest.fixture(scope="module")
def nf4_dir(tiny_fp_dir, tmp_path_factory):
    model = build_model(tiny_fp_dir)
    rebuilt = omitted_keys(tiny_fp_dir, model)
    cfg = NF4Config()
    out = tmp_path_factory.mktemp("nf4") / "nf4"
    save_nf4(model, cfg, quantize_model(model, cfg), out, rebuilt)
    return out


def _nf4_model(fp_dir, nf4_dir):
    model = build_model(fp_dir).eval()
    return model, to_nf4(model, nf4_dir)


def _trained_adapter(fp_dir, nf4_dir, out):
    model, fp = _nf4_model(fp_dir, nf4_dir)
    peft_model = add_lora(model, LoraSettings(DEFAULT_TARGETS))
    with torch.no_grad():  # make the adapter non-trivial
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    save_adapter(peft_model, out, {"base_fingerprint": fp, "lora_params": trainable_params(peft_model)})
    return peft_model


def test_adapter_is_peft_format_and_small(tiny_fp_dir, nf4_dir, tmp_path):
    peft_model = _trained_adapter(tiny_fp_dir, nf4_dir, tmp_path / "a")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files and "pqm_adapter.json" in files
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    n_lora = trainable_params(peft_model)
    base = count_params(build_model(tiny_fp_dir))
    assert 0 < n_lora < 0.05 * base  # the tiny model; the default recipe's is reported in results.json
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert all("lora_" in n for n in names)
    assert any("encoder.encoders.0.self_attn.linear_q" in n for n in names)
    assert not any("linear_k" in n or "src_attn" in n for n in names)


def test_adapter_reloads_exactly(tiny_fp_dir, nf4_dir, tmp_path):
    trained = _trained_adapter(tiny_fp_dir, nf4_dir, tmp_path / "a").eval()
    model, fp = _nf4_model(tiny_fp_dir, nf4_dir)
    loaded = load_adapter(model, tmp_path / "a", fp).eval()
    speech, lengths = torch.randn(1, 8000) * 0.1, torch.tensor([8000])
    with torch.no_grad():
        a = trained.base_model.model.encode(speech, lengths)[0]
        b = loaded.base_model.model.encode(speech, lengths)[0]
        with loaded.disable_adapter():
            c = loaded.base_model.model.encode(speech, lengths)[0]
    assert torch.equal(a, b)
    assert not torch.equal(b, c)  # the adapter really changes the output


def test_adapter_for_another_base_is_refused(tiny_fp_dir, nf4_dir, tmp_path):
    _trained_adapter(tiny_fp_dir, nf4_dir, tmp_path / "a")
    other_fp_dir = build_tiny_fp_dir(tmp_path / "other_fp", seed=1)
    other = build_model(other_fp_dir)
    rebuilt = omitted_keys(other_fp_dir, other)
    cfg = NF4Config()
    save_nf4(other, cfg, quantize_model(other, cfg), tmp_path / "other_nf4", rebuilt)
    model, fp = _nf4_model(other_fp_dir, tmp_path / "other_nf4")
    with pytest.raises(AdapterMismatch, match="trained on base model"):
        load_adapter(model, tmp_path / "a", fp)


def test_svd_init_starts_where_full_precision_was(tiny_fp_dir, nf4_dir):
    """--lora-init svd: each adapted layer's B @ A * scaling is the rank-r SVD of W_fp - W_nf4, so the
    effective weight is closer to full precision by exactly the removed singular values."""
    import bitsandbytes as bnb

    from pqm.lora import init_from_quantisation_error, linear_weights

    model = build_model(tiny_fp_dir).eval()
    fp_weights = linear_weights(model)
    to_nf4(model, nf4_dir)
    peft_model = add_lora(model, LoraSettings(DEFAULT_TARGETS, r=4, alpha=16, dropout=0.0))
    share = init_from_quantisation_error(peft_model, fp_weights)
    assert 0.0 < share < 1.0
    layers = [(n, m) for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    assert layers
    for name, layer in layers:
        base = layer.get_base_layer()
        quantised = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state)
        error = fp_weights[name.removeprefix("base_model.model.")] - quantised
        delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * layer.scaling["default"]
        s = torch.linalg.svdvals(error)
        assert torch.linalg.matrix_rank(delta, atol=1e-6) <= 4
        remaining = torch.linalg.norm(error - delta)
        assert torch.allclose(remaining, s[4:].square().sum().sqrt(), rtol=1e-3)
        assert remaining < torch.linalg.norm(error)
    # and the layer's output moves towards the full-precision layer's
    name, layer = layers[0]
    x = torch.randn(3, layer.get_base_layer().in_features)
    w = fp_weights[name.removeprefix("base_model.model.")]
    fp_out = x @ w.T + (layer.get_base_layer().bias if layer.get_base_layer().bias is not None else 0)
    with torch.no_grad():
        with_lora = layer(x)
        with peft_model.disable_adapter():
            without = layer(x)
    assert torch.linalg.norm(with_lora - fp_out) < torch.linalg.norm(without - fp_out)


def _two_adapters(fp_dir, nf4_dir, tmp_path):
    """Two different trained adapters, ``a`` and ``b`` (folders in ``tmp_path``), loaded on one NF4 model."""
    for seed, name in enumerate(("a", "b")):
        torch.manual_seed(seed)
        _trained_adapter(fp_dir, nf4_dir, tmp_path / name)
    model, fp = _nf4_model(fp_dir, nf4_dir)
    for name in ("a", "b"):
        model = load_adapter(model, tmp_path / name, fp, name=name)
    return model, fp


def test_row_mixtures_weigh_loaded_adapters_per_row(tiny_fp_dir, nf4_dir, tmp_path):
    """saml's mixtures (pqm.lora.RowAdapters): a row weighted wholly on one adapter is that adapter alone, a
    half-and-half row is neither, a router's weights get gradients, and the layers' scaling is left as it was."""
    from pqm.lora import RowAdapters

    model, fp = _two_adapters(tiny_fp_dir, nf4_dir, tmp_path)
    net = model.base_model.model
    speech, lengths = torch.randn(1, 8000).repeat(3, 1) * 0.1, torch.tensor([8000] * 3)
    alone = {}
    with torch.no_grad():
        for name in ("a", "b"):
            model.base_model.set_adapter(name)
            alone[name] = net.encode(speech[:1], lengths[:1])[0][0]
    model.base_model.set_adapter(["a", "b"])
    scaling = {id(m): dict(m.scaling) for m in model.modules() if hasattr(m, "scaling") and isinstance(m.scaling, dict)}
    logits = torch.zeros(3, 2, requires_grad=True)
    weights = torch.softmax(logits + torch.tensor([[1e4, 0], [0, 1e4], [0, 0]]), -1)
    with RowAdapters(model, [{"a": w[0], "b": w[1]} for w in weights]):
        mixed = net.encode(speech, lengths)[0]
    assert torch.allclose(mixed[0], alone["a"], atol=1e-5) and torch.allclose(mixed[1], alone["b"], atol=1e-5)
    assert not torch.allclose(mixed[2], alone["a"], atol=1e-4) and not torch.allclose(mixed[2], alone["b"], atol=1e-4)
    mixed[2].sum().backward()
    assert logits.grad[2].abs().sum() > 0
    assert {id(m): dict(m.scaling) for m in model.modules() if id(m) in scaling} == scaling


def test_merged_adapters_are_the_mixture_exactly_and_train(tiny_fp_dir, nf4_dir, tmp_path):
    """saml_sa's start (pqm.lora.merge_adapters): one adapter whose output is the weighted mixture's, of the
    experts' ranks added up, the only trainable parameters, saved and reloaded as a plain peft adapter."""
    from pqm.lora import RowAdapters, merge_adapters

    model, fp = _two_adapters(tiny_fp_dir, nf4_dir, tmp_path)
    net = model.base_model.model
    speech, lengths = torch.randn(1, 8000) * 0.1, torch.tensor([8000])
    weights = {"a": 0.7, "b": 0.3}
    model.base_model.set_adapter(["a", "b"])
    with torch.no_grad(), RowAdapters(model, [weights]):
        mixed = net.encode(speech, lengths)[0]
    per_expert = sum(p.numel() for n, p in model.named_parameters() if ".a." in n and "lora_" in n)
    merge_adapters(model, weights)
    assert set(model.peft_config) == {"default"} and model.peft_config["default"].r == 16
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n and "lora_" in n for n in trainable)
    assert trainable_params(model) == 2 * per_expert
    with torch.no_grad():
        merged = net.encode(speech, lengths)[0]
        with model.disable_adapter():
            bare = net.encode(speech, lengths)[0]
    assert torch.allclose(merged, mixed, atol=1e-5) and not torch.allclose(merged, bare, atol=1e-3)
    save_adapter(model, tmp_path / "merged", {"base_fingerprint": fp, "lora_params": trainable_params(model)})
    assert json.loads((tmp_path / "merged" / "adapter_config.json").read_text())["r"] == 16
    again, _ = _nf4_model(tiny_fp_dir, nf4_dir)
    again = load_adapter(again, tmp_path / "merged", fp)
    with torch.no_grad():
        assert torch.allclose(again.base_model.model.encode(speech, lengths)[0], merged, atol=1e-5)


def test_kmeans_finds_separated_groups():
    from pqm.saml import expert_names, kmeans

    gen = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(5, 3, generator=gen) * 0.01 + c for c in (torch.ones(3), -torch.ones(3), torch.zeros(3))])
    order = torch.randperm(15, generator=gen)
    assign = kmeans(points[order], 3)
    groups = {tuple(sorted(order[i].item() // 5 for i in range(15) if assign[i] == j)) for j in range(3)}
    assert groups == {(0,) * 5, (1,) * 5, (2,) * 5}
    assert assign[0] == 0 and sorted(set(assign)) == [0, 1, 2]
    assert expert_names(2) == ["expert01", "expert02"]


def test_held_out_router_batches_are_of_one_group_without_its_expert():
    """saml's --hold-out-own-expert: every cut comes once, in batches of one group's cuts, each with a mask
    that holds out exactly that group's expert; with one expert and no SAT there is nothing to route to."""
    from lhotse import CutSet, MonoCut, Recording, SupervisionSegment

    from pqm.errors import BadInput
    from pqm.saml import held_out_batches

    def cut(i: int, speaker: str) -> MonoCut:
        rec = Recording(id=f"r{i}", sources=[], sampling_rate=16000, num_samples=16000, duration=1.0)
        return MonoCut(id=f"c{i}", start=0, duration=1.0, channel=0, recording=rec,
                       supervisions=[SupervisionSegment(id=f"s{i}", recording_id=f"r{i}", start=0, duration=1.0,
                                                        speaker=speaker)])

    speakers = ["ann", "bob", "cy"] * 7
    cuts = CutSet.from_cuts(cut(i, s) for i, s in enumerate(speakers))
    members = {"expert01": ["ann", "cy"], "expert02": ["bob"], "sat": []}
    names = list(members)

    def iterate(group, epoch, seed):  # batches of 2: their cut ids kept for the check
        ids = [c.id for c in group]
        return ({"ids": torch.tensor([int(i[1:]) for i in ids[k:k + 2]])} for k in range(0, len(ids), 2))

    seen = []
    for batch, mask in held_out_batches(iterate, cuts, members, names, epoch=0, seed=0):
        group = {"expert01" if speakers[i] in ("ann", "cy") else "expert02" for i in batch["ids"].tolist()}
        assert len(group) == 1 and mask.tolist() == [n in group for n in names]
        seen += batch["ids"].tolist()
    assert sorted(seen) == list(range(len(speakers)))
    with pytest.raises(BadInput, match="needs another expert"):
        next(held_out_batches(iterate, cuts, {"expert01": ["ann", "bob", "cy"]}, ["expert01"], epoch=0, seed=0))

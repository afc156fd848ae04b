"""Stage 5: quantise the full-precision model to NF4 and report sizes on disk."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pqm.errors import cli, setup_logging
from pqm.families import family
from pqm.files import read_json, write_json
from pqm.nf4 import NF4Config, count_params, quantize_model, save_nf4


def main(argv: list[str] | None = None) -> None:
    default = NF4Config()
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--fp-dir", type=Path, required=True, help="full-precision model (stage 4)")
    p.add_argument("--out", type=Path, required=True, help="NF4 model folder to write")
    p.add_argument("--blocksize", type=int, default=default.blocksize)
    p.add_argument("--double-quant", type=lambda s: s.lower() in ("1", "true", "yes"), default=default.double_quant)
    p.add_argument("--min-conv-numel", type=int, default=default.min_conv_numel,
                   help="quantise convolutions with at least this many weights")
    p.add_argument("--embeddings", type=lambda s: s.lower() in ("1", "true", "yes"), default=False,
                   help="also quantise the token embedding and the output projection tied to it (Whisper)")
    p.add_argument("--unquantised-dtype", choices=("float32", "float16"), default=None,
                   help="how the file stores what stays in full precision (norms, biases, positions, small "
                        "convolutions); default: the family's UNQUANTISED_DTYPE")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    setup_logging()
    if a.blocksize not in (64, 128, 256, 512, 1024, 2048, 4096):
        p.error(f"--blocksize {a.blocksize}: bitsandbytes supports 64..4096 (powers of two)")
    models = family(a.fp_dir)
    embeddings = models.embedding_modules() if a.embeddings else []
    if a.embeddings and not embeddings:
        p.error(f"--embeddings true: the {models.__name__} family has no embedding quantisation")
    cfg = NF4Config(a.blocksize, a.double_quant, a.min_conv_numel, models.keep_full_precision(a.embeddings), embeddings,
                    a.unquantised_dtype or models.UNQUANTISED_DTYPE)
    model = models.build_model(a.fp_dir, device=a.device)
    n_params = count_params(model)
    omitted = models.omitted_keys(a.fp_dir, model)
    modules = quantize_model(model, cfg, device=a.device)
    base_fingerprint = save_nf4(model, cfg, modules, a.out, omitted)
    fp32_bytes = (a.fp_dir / "model.safetensors").stat().st_size  # Whisper: save_pretrained's float32 file
    nf4_bytes = (a.out / "model.safetensors").stat().st_size
    report = {
        "size_bytes": {"fp32": fp32_bytes, "nf4": nf4_bytes},
        "ratio": round(fp32_bytes / nf4_bytes, 3),
        "params": n_params,
        "quantised_modules": len(modules),
        "embeddings_quantised": bool(embeddings),
        "fingerprint": base_fingerprint,
    }
    breakdown = read_json(a.out / "nf4.json")["size_breakdown_bytes"]
    report["breakdown_bytes"] = {**breakdown, "safetensors header (names, shapes)": nf4_bytes - sum(breakdown.values())}
    write_json(a.out / "size.json", report)
    logging.info(f"fp32 {fp32_bytes} bytes, NF4 {nf4_bytes} bytes: {report['ratio']}x smaller; the NF4 file holds:")
    for what, size in report["breakdown_bytes"].items():
        logging.info(f"  {size / 1e6:9.2f} MB {100 * size / nf4_bytes:5.1f}%  {what}")


if __name__ == "__main__":
    cli(main)

#!/usr/bin/env bash
# TED-LIUM 3 with an ESPnet Conformer AED (the paper's setting): the top-level
# pipeline with --corpus tedlium3. Point --corpus-opts "--corpus-dir DIR" at an unpacked
# TEDLIUM_release-3 folder, or let stage 1 download it into downloads/
# (network and about 55 GB needed).
#   egs/tedlium3/run.sh --device cuda --ngpu 4
#   egs/tedlium3/run.sh --pretrained path/to/espnet_tedlium3_exp --device cuda   # skip training
set -euo pipefail
cd "$(dirname "$0")/../.."
exec ./run.sh --corpus tedlium3 --datadir data/tedlium3 --model conformer \
    --train-config conf/train_conformer_tedlium3.yaml --token-type bpe --nbpe 500 --max-epoch 50 \
    --beam-size 10 --ctc-weight 0.3 "$@"

#!/usr/bin/env bash
# Your own corpus: the top-level pipeline with --corpus custom. Give three Kaldi
# data dirs (or lhotse cuts manifests) and a model, e.g.
#   egs/custom/run.sh --corpus-opts "--train-data data/mine/train --adapt-data data/mine/adapt --eval-data data/mine/eval" \
#       --model whisper --pretrained ../shared/models/whisper-tiny.en
# Relative paths are taken from the top of the repository. Options pass through.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec ./run.sh --corpus custom --datadir data/custom "$@"

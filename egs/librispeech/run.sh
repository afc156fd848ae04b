#!/usr/bin/env bash
# LibriSpeech with Whisper (the paper's setting): the top-level pipeline with
# --corpus librispeech. Point --corpus-opts "--corpus-dir DIR" at an unpacked LibriSpeech
# folder, or let stage 1 download the parts into downloads/ (network needed).
#   egs/librispeech/run.sh --pretrained openai/whisper-small.en --device cuda
set -euo pipefail
cd "$(dirname "$0")/../.."
exec ./run.sh --corpus librispeech --datadir data/librispeech --model whisper "$@"

#!/usr/bin/env bash
# LibriSpeech with Whisper (the paper's setting): the top-level pipeline with
# --corpus librispeech. Point --librispeech-dir at an unpacked LibriSpeech
# folder, or let stage 2 download the parts into --download-dir (network needed).
#   egs/librispeech/run.sh --pretrained openai/whisper-small.en --device cuda
set -euo pipefail
cd "$(dirname "$0")/../.."
exec ./run.sh --corpus librispeech --datadir data/librispeech --model whisper --adapt-per-speaker 20 "$@"

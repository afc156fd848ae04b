#!/usr/bin/env bash
# speechocean762 (real non-native English, children and adults) with whisper-tiny.en:
# the top-level pipeline with this corpus's settings (egs/speechocean762/README.md).
# Options pass through: egs/speechocean762/run.sh --stage 7 --stop-stage 9
set -euo pipefail
cd "$(dirname "$0")/../.."
exec ./run.sh --corpus speechocean762 --datadir data/speechocean762 --model whisper \
    --pretrained ../shared/models/whisper-tiny.en \
    --whisper-window trimmed --target-style model --sa-holdout 3 \
    --sat-epochs 2 --sat-max-duration 64 --sa-epochs 10 --sa-lr 0.0003 --beam-size 1 "$@"

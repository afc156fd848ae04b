#!/usr/bin/env bash
# The default recipe on FSDD connected digits: the top-level pipeline with this
# corpus's settings. Options pass through: ./run.sh --stage 5 --stop-stage 9
set -euo pipefail
cd "$(dirname "$0")/../.."
exec ./run.sh --corpus fsdd "$@"

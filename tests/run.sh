#!/usr/bin/env bash
# The test command of README.md: sets up the virtual environment (once) and runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. ./path.sh
exec python -m pytest tests "$@"

#!/usr/bin/env bash
# The test command of README.md: sets up the virtual environment (once) and runs pytest.
#   bash tests/run.sh              every tier (what CI runs)
#   bash tests/run.sh --tier unit  the developer's loop (about a minute on 2 cores)
#   bash tests/run.sh --tier e2e   recipe stages end to end, real models trained and decoded
#   bash tests/run.sh --tier slurm the Slurm backend on a local single-node cluster
# Other arguments go to pytest (e.g. -k whisper -x).
set -euo pipefail
cd "$(dirname "$0")/.."
tier=all
if [ "${1:-}" = --tier ]; then
    tier=${2:?--tier needs unit, e2e, slurm or all}
    shift 2
fi
case "${tier}" in
    all) select="" ;;
    unit) select="not e2e and not slurm" ;;
    e2e) select="e2e" ;;
    slurm) select="slurm" ;;
    *) echo "tests/run.sh: --tier ${tier}: use unit, e2e, slurm or all" >&2; exit 2 ;;
esac
. ./path.sh
# Two pytest-xdist workers (PQM_TEST_WORKERS): most of a recipe test is single-threaded Python start-up.
exec python -m pytest tests -m "${select}" -n "${PQM_TEST_WORKERS:-2}" --dist loadgroup --no-loadscope-reorder "$@"

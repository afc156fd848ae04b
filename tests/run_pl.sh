#!/usr/bin/env bash
# A minimal stand-in for a site's Kaldi utils/run.pl (tests only): Kaldi's options, then
# JOB=a:b LOG COMMAND...; runs the tasks one after another, each into its log. It records the
# options it was given in $RUN_PL_SEEN, so a test can check what run.sh passed.
set -u
options=()
while [ $# -gt 0 ] && [[ "$1" == --* ]]; do options+=("$1" "$2"); shift 2; done
echo "${options[*]}" >> "${RUN_PL_SEEN:-/dev/null}"
[[ "$1" =~ ^JOB=([0-9]+):([0-9]+)$ ]] || { echo "run_pl.sh: bad range $1" >&2; exit 1; }
first=${BASH_REMATCH[1]} last=${BASH_REMATCH[2]} log=$2
shift 2
failed=0
for ((job = first; job <= last; job++)); do
    args=()
    for word in "$@"; do args+=("${word//JOB/${job}}"); done
    echo "# ${args[*]}" > "${log//JOB/${job}}"
    "${args[@]}" >> "${log//JOB/${job}}" 2>&1 || failed=$((failed + 1))
done
[ "${failed}" -eq 0 ] || { echo "run_pl.sh: ${failed} jobs failed" >&2; exit 1; }

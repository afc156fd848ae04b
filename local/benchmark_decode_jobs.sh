#!/usr/bin/env bash
# Stage 8's split of the speakers into jobs, measured: the per-speaker systems of the first N test speakers
# decoded by N processes (one a speaker, as one job a speaker did) and by one process (as a job of several
# speakers does), one thread each, one after the other in the same run. Prints both wall times, their
# ratio, and whether the hypotheses are the same.
# Usage: local/benchmark_decode_jobs.sh EXPDIR EVAL_CUTS [N] [SYSTEM ...]
#   local/benchmark_decode_jobs.sh exp/speechocean762_whisper \
#       data/speechocean762/manifests/speechocean762_cuts_eval.jsonl.gz 6 pqm nf4_sa pqm_unsup
# Decoding settings are pqm.decode's defaults but --beam-size 1 (the speechocean762 recipe's).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: $0 EXPDIR EVAL_CUTS [N] [SYSTEM ...]" >&2; exit 2; }
expdir=$1 cuts=$2 n=${3:-6}
shift $(( $# < 3 ? $# : 3 ))
systems=("$@"); [ ${#systems[@]} -gt 0 ] || systems=(pqm nf4_sa)
[ -s "${expdir}/test_speakers.txt" ] || { echo "$0: ${expdir}/test_speakers.txt is missing: run stages 7-8 first" >&2; exit 1; }
. ./path.sh
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
out=$(mktemp -d)
trap 'rm -rf "${out}"' EXIT
read -r -a speakers <<< "$(tr -s ' \n' ' ' < "${expdir}/test_speakers.txt")"
speakers=("${speakers[@]:0:${n}}")
echo "${speakers[*]}" > "${out}/speakers.txt"
decode=(python -m pqm.decode --fp-dir "${expdir}/fp" --nf4-dir "${expdir}/nf4" --sat-dir "${expdir}/sat"
    --adapter-dir "${expdir}/adapters" --cuts "${cuts}" --systems "${systems[@]}" --beam-size 1)
start=${EPOCHREALTIME}
for spk in "${speakers[@]}"; do
    "${decode[@]}" --out "${out}/apart" --speaker "${spk}" > "${out}/apart.${spk}.log" 2>&1 \
        || { cat "${out}/apart.${spk}.log" >&2; exit 1; }
done
middle=${EPOCHREALTIME}
"${decode[@]}" --out "${out}/together" --speaker-list "${out}/speakers.txt" --job 1 > "${out}/together.log" 2>&1 \
    || { cat "${out}/together.log" >&2; exit 1; }
end=${EPOCHREALTIME}
same=yes
for spk in "${speakers[@]}"; do
    for system in "${systems[@]}"; do
        cmp -s "${out}/apart/${system}/${spk}/text" "${out}/together/${system}/${spk}/text" || same=no
    done
done
python3 -c "a, b = ${middle} - ${start}, ${end} - ${middle}
print(f'${#speakers[@]} speakers x ${#systems[@]} systems (${systems[*]}): one process a speaker {a:.0f} s, '
      f'one process {b:.0f} s, {a / b:.2f}x; the same hypotheses: ${same}')"

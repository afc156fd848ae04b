#!/usr/bin/env bash
# How much speech a speaker needs: stages 7-9 again for each amount of adaptation speech per test speaker.
# Usage: local/data_amounts.sh EXPDIR [N ...] [-- OPTION ...]    (default amounts: 1 2 5 10)
# After ./run.sh (or egs/<corpus>/run.sh) made EXPDIR: each amount N reruns that command (the last line of
# EXPDIR/run.cmd) from stage 7 with --sa-utts N (each test speaker's first N adaptation utterances) in
# EXPDIR/amounts/sa_utts<N>, on EXPDIR's NF4 model and SAT adapter; the systems that use no adaptation
# speech (fp, nf4, nf4_sat and saml) are taken from EXPDIR, not decoded again. Then pqm.data_amounts writes
# EXPDIR/RESULTS_data_amounts.md and EXPDIR/wer_vs_data.png. Turn pqm_unsup on in the original run
# (--unsup true) to have it among the lines. Options after -- are added to every amount's command, e.g.
# "-- --sa-holdout 0" where the recipe holds out more utterances than the smallest amounts have.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: $0 EXPDIR [N ...] [-- OPTION ...]" >&2; exit 2; }
expdir=$1; shift
amounts=(); extra=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do amounts+=("$1"); shift; done
[ $# -eq 0 ] || { shift; extra=("$@"); }
[ ${#amounts[@]} -gt 0 ] || amounts=(1 2 5 10)
for f in run.cmd .done/stage9 results.json; do
    [ -e "${expdir}/${f}" ] || { echo "$0: ${expdir}/${f} is missing: run the recipe to the end first" >&2; exit 1; }
done
command=$(tail -n 1 "${expdir}/run.cmd")
for n in "${amounts[@]}"; do
    [[ "${n}" =~ ^[1-9][0-9]*$ ]] || { echo "$0: amount ${n}: a positive number of utterances is needed" >&2; exit 2; }
    run=${expdir}/amounts/sa_utts${n}
    mkdir -p "${run}/.done" "${run}/decode"
    for part in fp nf4 sat saml; do  # saml: where stage 6 made it (--saml-experts)
        if [ -e "${expdir}/${part}" ]; then ln -sfn "$(realpath "${expdir}/${part}")" "${run}/${part}"; fi
    done
    for n6 in 1 2 3 4 5 6; do cp "${expdir}/.done/stage${n6}" "${run}/.done/"; done
    for system in fp nf4 nf4_sat saml; do  # decoded once: the same model and data whatever the amount
        if [ -e "${expdir}/decode/${system}" ] && [ ! -e "${run}/decode/${system}" ]; then
            cp -r "${expdir}/decode/${system}" "${run}/decode/${system}"
        fi
    done
    echo "$(date '+%Y-%m-%dT%H:%M:%S') (data_amounts.sh) ${n} adaptation utterances per speaker: ${run}"
    eval "${command} --expdir ${run@Q} --stage 7 --stop-stage 9 --sa-utts ${n} ${extra[*]@Q}"
done
. ./path.sh
python -m pqm.data_amounts --expdir "${expdir}"

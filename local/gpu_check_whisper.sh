#!/usr/bin/env bash
# A short check of the Whisper path on a GPU, stage by stage without run.sh:
# copy the pretrained model (stage 4), NF4 with the embedding (5), one SAT epoch
# on a few utterances (6), decode one test speaker with fp, nf4 and nf4_sat (8).
# Prints each step's wall time and writes them to WORKDIR/timing.txt.
#   local/gpu_check_whisper.sh PRETRAINED DATADIR WORKDIR [DEVICE] [SAT_UTTS] [SPEAKER]
# DATADIR is a stage-2 data folder (its manifests/); run on the machine that has the GPU.
set -euo pipefail
pretrained=$1 datadir=$2 work=$3 device=${4:-cuda} sat_utts=${5:-32} speaker=${6:-george}
m=${datadir}/manifests
mkdir -p "${work}"
: > "${work}/timing.txt"
step() {
    local name=$1 start=${EPOCHREALTIME}
    shift
    "$@" > "${work}/${name}.log" 2>&1 || { tail -30 "${work}/${name}.log"; echo "step ${name} failed" >&2; exit 1; }
    printf '%s %.1f s\n' "${name}" "$(python3 -c "print(${EPOCHREALTIME} - ${start})")" | tee -a "${work}/timing.txt"
}
step load python -m pqm.families train --model whisper --pretrained "${pretrained}" --expdir "${work}" \
    --datadir "${datadir}" --corpus fsdd
step quantise python -m pqm.quantize --fp-dir "${work}/fp" --out "${work}/nf4" --embeddings true --device "${device}"
step sat_epoch python -m pqm.adapt --fp-dir "${work}/fp" --nf4-dir "${work}/nf4" --cuts "${m}/fsdd_cuts_train.jsonl.gz" \
    --max-utts "${sat_utts}" --epochs 1 --batch-size 8 --lr 0.0005 --out "${work}/sat" --device "${device}"
step decode python -m pqm.decode --fp-dir "${work}/fp" --nf4-dir "${work}/nf4" --sat-dir "${work}/sat" \
    --adapter-dir "${work}/adapters" --cuts "${m}/fsdd_cuts_eval.jsonl.gz" --speaker "${speaker}" \
    --systems fp nf4 nf4_sat --beam-size 4 --out "${work}/decode" --device "${device}"
grep -h "decoded" "${work}/decode.log" | sed 's/.*INFO: //'

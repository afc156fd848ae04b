#!/usr/bin/env bash
# pqm recipe: personalised NF4 ASR. Default: connected digits (FSDD); --corpus speechocean762|librispeech|tedlium3|custom (egs/<corpus>).
#   1 corpus  2 lhotse manifests  3 the model's data  4 train/load the model
#   5 NF4  6 SAT LoRA  7 per-speaker LoRA  8 decode all systems  9 score
# Usage: ./run.sh [--stage N] [--stop-stage M] [--nj J] [--option value ...]
set -euo pipefail
cd "$(dirname "$0")"

# Options (each can be given as --name-with-dashes value)
stage=1                 # first stage to run
stop_stage=9            # last stage to run
nj=2                    # jobs for per-speaker work (stages 7, 8): the test speakers split into at most nj
threads=0               # threads per job (0: cores / jobs); passed to ${cmd} as Kaldi's --num-threads
expdir=""               # experiment folder (default: exp/<corpus>_<model>)
datadir=data            # data folder (manifests, audio, Kaldi dirs)
corpus=fsdd             # fsdd (the default digit task), speechocean762, librispeech, tedlium3 or custom (pqm/recipes/)
corpus_opts=""          # the corpus's own options, one string (python -m pqm.recipes --corpus NAME --help lists them)
model=conformer         # model family: conformer (ESPnet, trained in stage 4) or whisper (transformers, --pretrained)
pretrained=""           # conformer: ESPnet model folder to load instead of training; whisper: a Whisper folder or model name
seed=0                  # random seed for data, training and adaptation
device=cpu              # cpu or cuda
ngpu=1                  # with --device cuda: GPUs for training (stage 4: ESPnet's multi-GPU; stage 6: torchrun)
sat_nproc=0             # stage 6 processes under torchrun with DDP (0: ngpu on cuda, 1 on cpu; >1 on cpu uses gloo)
train_config=conf/train_conformer.yaml
token_type=""           # conformer tokens: word or bpe (sentencepiece unigram); default: the corpus's
nbpe=500                # token_type bpe: vocabulary size
max_epoch=12            # Conformer training epochs
nf4_blocksize=64
nf4_double_quant=true
nf4_min_conv_numel=2048 # quantise convolutions with at least this many weights
nf4_embeddings=false    # whisper: also quantise the token embedding and the output projection tied to it
nf4_unquantised_dtype=""  # float32 or float16: how NF4 stores what stays full precision (default: the family's)
lora_r=8
lora_alpha=16
lora_targets=""         # regex over module names (default: the model family's DEFAULT_TARGETS, pqm/families/)
sat_epochs=1
sat_lr=0.001
sat_utts=0              # SAT on at most this many training utterances (0: all)
sat_max_duration=0      # SAT batches of similar-length utterances of at most this many seconds (0: 16 utterances)
sat_speed_perturb=family  # stage 6 (SAT, saml's experts and router): every training utterance at each speed, e.g. "0.9 1.0 1.1" ("": off; family: the model family's, Conformer 0.9 1.0 1.1, Whisper off)
sat_init=zero           # SAT LoRA start: zero (peft's default, B = 0) or svd (the rank-r SVD of the NF4 quantisation error)
saml_experts=0          # also saml: at most this many LoRA experts of training-speaker groups and a router over them (0: off)
saml_epochs=2           # saml: each expert's epochs from SAT on its group (lr: --sat-lr)
saml_router_epochs=1    # saml: the router's epochs on the training utterances, experts frozen
saml_router_holdout=false  # saml: SAT one more expert, and the router learns each utterance without its own group's expert
sa_epochs=10
sa_utts=0               # per-speaker adaptation on each speaker's first N adaptation utterances (0: all; local/data_amounts.sh)
sa_lr=0.001
sa_lr_schedule=constant # per-speaker lr: constant, or linear (warm-up over 10% of the steps, then linear decay to 0)
unsup=false             # also pqm_unsup: per-speaker LoRA from SAT on nf4_sat's own hypotheses (transcripts unread)
unsup_keep=0.3          # pqm_unsup: the fraction of those hypotheses kept as targets, the most confident
unsup_labeller=nf4_sat  # pqm_unsup: whose hypotheses: nf4_sat's (the adapter's start) or saml's (needs --saml-experts)
unsup_rounds=1          # pqm_unsup: rounds of self-training, each after the first on the hypotheses of the round before's adapter
unsup_token_floor=0     # pqm_unsup: mask the tokens of a kept hypothesis below this probability out of the loss (0: off; README)
unsup_prior=0           # pqm_unsup: label, and decode, under a per-speaker token bias towards the training transcripts' token prior, estimated in N decodings (0: off; Conformer only; README)
sa_holdout=0            # do no harm: hold out N adaptation utterances per speaker, keep the best epoch if no worse there (0: off)
unsup_holdout=0         # pqm_unsup's own: hold out N, judged by the loss of the labeller's hypotheses of them (0: off; README)
whisper_window=trimmed  # whisper LoRA training (and the adapted systems' decoding): trimmed or padded (30 s) input
target_style=corpus     # whisper LoRA targets: corpus (as is), sentence or model (restyled: pqm/restyle.py)
whisper_max_tokens_per_second=0  # whisper decoding: at most this many tokens per second of audio + 8 (0: 128 tokens)
beam_size=4
ctc_weight=0.5          # CTC weight in joint decoding (chosen on the valid set of training speakers)
cmd_backend=local       # local or slurm (see cmd.sh)
cluster_config=conf/slurm.yaml  # slurm backend: partition, time, memory, CPUs, GPUs per task
# End of options

cmdline="$0$(printf " %q" "$@")"  # quoted as typed, so that it can be run again
. ./local/parse_options.sh
. ./path.sh
. ./cmd.sh

log() { echo "$(date '+%Y-%m-%dT%H:%M:%S') (run.sh:${BASH_LINENO[0]}) $*"; }
die() { echo "$(date '+%Y-%m-%dT%H:%M:%S') (run.sh:${BASH_LINENO[0]}) ERROR: $*" >&2; exit 1; }
options() {  # every option of the list above (and "$@") as a "--name value" line
    local v; for v in $(sed -n '/^# Options/,/^# End of options/s/^\([a-z0-9_]*\)=.*/\1/p' "$(basename "$0")") "$@"; do
        echo "--${v//_/-} ${!v}"; done
}

# Every option is checked before anything is written (pqm/stages.py: RULES).
python -m pqm.stages --options "$(options)" validate || exit 1
[ "${unsup_labeller}" = nf4_sat ] || [ "${saml_experts}" -gt 0 ] \
    || die "--unsup-labeller ${unsup_labeller}: saml decodes only with --saml-experts K > 0 (stage 6 makes it)"
[ "${unsup_prior}" -eq 0 ] || [ "${model}" != whisper ] \
    || die "--unsup-prior ${unsup_prior}: Whisper's decoding takes no token bias (the Conformer's does); use 0"
[ "${cmd_backend}" = local ] || python -m pqm.slurm --check "${cluster_config}" || die "--cmd-backend slurm: fix the above first"
expdir=${expdir:-exp/${corpus}_${model}}
corpus_info=$(python -m pqm.recipes check --corpus "${corpus}" --datadir "${datadir}" --corpus-opts "${corpus_opts}") \
    || die "--corpus ${corpus} --corpus-opts '${corpus_opts}': see above (python -m pqm.recipes --corpus ${corpus} --help)"
token_type=${token_type:-$(sed -n 's/^token_type //p' <<< "${corpus_info}")}
corpus_inputs=$(sed -n 's/^inputs //p' <<< "${corpus_info}")  # a digest of inputs no option names (custom's tables)
family_opts=(--model "${model}" --expdir "${expdir}" --datadir "${datadir}" --corpus "${corpus}" --pretrained "${pretrained}"
    --token-type "${token_type}" --nbpe "${nbpe}" --train-config "${train_config}" --max-epoch "${max_epoch}"
    --seed "${seed}" --device "${device}" --ngpu "${ngpu}")
family_info=$(python -m pqm.families check "${family_opts[@]}") || die "--model ${model}: see above"
nf4_unquantised_dtype=${nf4_unquantised_dtype:-$(sed -n 's/^unquantised_dtype //p' <<< "${family_info}")}
[ "${sat_speed_perturb}" != family ] || sat_speed_perturb=$(sed -n 's/^sat_speed_perturb *//p' <<< "${family_info}")
# lhotse reads TED-LIUM's .sph with sph2pipe; without it, with libsndfile
[ "${corpus}" != tedlium3 ] || command -v sph2pipe > /dev/null || export LHOTSE_AUDIO_BACKEND=LibsndfileBackend
[ "${sat_nproc}" -gt 0 ] || sat_nproc=$([ "${device}" = cuda ] && echo "${ngpu}" || echo 1)
mkdir -p "${expdir}/log" "${expdir}/timing" "${expdir}/.done" "${datadir}"
echo "${cmdline}" >> "${expdir}/run.cmd"

# The done markers record the options each stage depends on (pqm/stages.py: STAGE_INPUTS); a stage done
# with other options is redone, with the later ones.
stages=(python -m pqm.stages --expdir "${expdir}" --options "$(options corpus_inputs)")
"${stages[@]}" check "${stage}" || exit 1

# run_stage N "title" command...: runs a stage unless it is done with these options,
# logs to ${expdir}/log/stageN.log, records its wall time and options.
run_stage() {
    local n=$1 title=$2 start=${SECONDS} rc
    shift 2
    if [ "${stage}" -gt "${n}" ] || [ "${stop_stage}" -lt "${n}" ]; then return 0; fi
    "${stages[@]}" begin "${n}" "${title}" || { rc=$?; [ "${rc}" -eq 3 ] && return 0; exit 1; }
    set +e
    ( set -e; "$@" ) 2>&1 | tee "${expdir}/log/stage${n}.log"
    rc=${PIPESTATUS[0]}
    set -e
    [ "${rc}" -eq 0 ] || die "stage ${n} failed; see ${expdir}/log/stage${n}.log"
    "${stages[@]}" done "${n}" $((SECONDS - start))
}

manifests=${datadir}/manifests
cuts() { echo "${manifests}/${corpus}_cuts_$1.jsonl.gz"; }  # stage 2's lhotse cuts of set $1
speakers=${expdir}/test_speakers.txt  # task N of a per-speaker job array takes the speakers on line N
thread_opts=()  # Kaldi's --num-threads; without it pqm.launch gives each job cores / jobs
[ "${threads}" -eq 0 ] || thread_opts=(--num-threads "${threads}")
sat_launcher=(python)
[ "${sat_nproc}" -gt 1 ] && sat_launcher=(python -m torch.distributed.run --standalone --nproc-per-node "${sat_nproc}")
corpus_stage=(python -m pqm.recipes --corpus "${corpus}" --datadir "${datadir}" --seed "${seed}" --corpus-opts "${corpus_opts}")
opts_nf4=(--fp-dir "${expdir}/fp" --nf4-dir "${expdir}/nf4" --device "${device}")
read -ra speed_factors <<< "${sat_speed_perturb}"
opts_sat=(--speed-perturb "${speed_factors[@]}")  # stage 6's training data (an empty list: as they are)
opts_lora=("${opts_nf4[@]}" --lora-r "${lora_r}" --lora-alpha "${lora_alpha}" --lora-targets "${lora_targets}"
    --seed "${seed}" --window "${whisper_window}" --target-style "${target_style}")

speaker_jobs() {  # speaker_jobs NAME command...: the test speakers split into at most ${nj} jobs, task N for line N of ${speakers}
    local n
    n=$(python -m pqm.jobs --manifests "${manifests}" --out "${speakers}" --num-jobs "${nj}")
    log "${1}: $(wc -w < "${speakers}") speakers in ${n} jobs (logs: ${expdir}/log/${1}.*.log)"
    PQM_TASK_NAMES=${speakers} ${cmd} --max-jobs-run "${nj}" "${thread_opts[@]}" "JOB=1:${n}" "${expdir}/log/${1}.JOB.log" \
        "${@:2}" --speaker-list "${speakers}" --job JOB
}

saml=${expdir}/saml
stage6() {  # SAT; with --saml-experts K also saml: groups of training speakers, an expert from SAT on each, the router
    "${sat_launcher[@]}" -m pqm.adapt "${opts_lora[@]}" --cuts "$(cuts train)" --max-utts "${sat_utts}" \
        --epochs "${sat_epochs}" --lr "${sat_lr}" --lora-init "${sat_init}" --max-duration "${sat_max_duration}" \
        "${opts_sat[@]}" --out "${expdir}/sat"
    [ "${saml_experts}" -gt 0 ] || return 0
    local opts_saml=("${opts_nf4[@]}" --cuts "$(cuts train)" --saml-dir "${saml}" --seed "${seed}" \
        --window "${whisper_window}" --max-duration "${sat_max_duration}")
    local sat_expert=() hold_out=()
    [ "${saml_router_holdout}" = false ] || { sat_expert=(--sat-expert "${expdir}/sat"); hold_out=(--hold-out-own-expert); }
    python -m pqm.saml groups "${opts_saml[@]}" --experts "${saml_experts}" "${sat_expert[@]}"
    local group
    for group in "${saml}"/cuts/expert*.jsonl.gz; do  # names made by pqm.saml, never from speaker ids
        python -m pqm.adapt "${opts_lora[@]}" --init "${expdir}/sat" --cuts "${group}" --epochs "${saml_epochs}" \
            --lr "${sat_lr}" --max-duration "${sat_max_duration}" "${opts_sat[@]}" --out "${saml}/experts/$(basename "${group}" .jsonl.gz)"
    done
    python -m pqm.saml router "${opts_saml[@]}" --epochs "${saml_router_epochs}" "${hold_out[@]}" "${opts_sat[@]}"
}

adapted=(pqm nf4_sa); [ "${unsup}" = false ] || adapted+=(pqm_unsup)  # the per-speaker systems (pqm/systems.py)
[ "${saml_experts}" -eq 0 ] || adapted+=(saml_sa)  # from saml's experts merged at the speaker's mean routing weights
stage7() {  # one job per speaker trains every system's adapter; a failed one stops neither the others nor other speakers
    speaker_jobs adapt python -m pqm.adapt_speakers "${opts_lora[@]}" --sat-dir "${expdir}/sat" --saml-dir "${saml}" \
        --systems "${adapted[@]}" --holdout "${sa_holdout}" --unsup-holdout "${unsup_holdout}" \
        --unsup-labeller "${unsup_labeller}" --pseudo-keep "${unsup_keep}" --pseudo-rounds "${unsup_rounds}" \
        --pseudo-token-floor "${unsup_token_floor}" --pseudo-prior-iters "${unsup_prior}" --pseudo-prior-cuts "$(cuts train)" \
        --cuts "$(cuts adapt)" --max-utts "${sa_utts}" --epochs "${sa_epochs}" --lr "${sa_lr}" --lr-schedule "${sa_lr_schedule}" \
        --ctc-weight "${ctc_weight}" --adapters "${expdir}/adapters" || die "adaptation failed for the speakers listed above; rerun stage 7 to redo only those"
}

shared=(); [ "${saml_experts}" -eq 0 ] || shared+=(saml)  # speaker-independent systems of stage 6's options
stage8() {  # every system, per test speaker
    [ -e "${expdir}/adapters/pqm" ] || die "missing ${expdir}/adapters/pqm: run stage 7 first (./run.sh --stage 7 with the options in ${expdir}/run.cmd)"
    speaker_jobs decode python -m pqm.decode "${opts_nf4[@]}" --sat-dir "${expdir}/sat" --adapter-dir "${expdir}/adapters" \
        --saml-dir "${saml}" --cuts "$(cuts eval)" --systems fp nf4 nf4_sat "${adapted[@]}" "${shared[@]}" \
        --beam-size "${beam_size}" --ctc-weight "${ctc_weight}" \
        --max-tokens-per-second "${whisper_max_tokens_per_second}" --out "${expdir}/decode"
}

run_stage 1 "get the corpus" "${corpus_stage[@]}" download
run_stage 2 "lhotse manifests (and the speaker split)" "${corpus_stage[@]}" prepare
run_stage 3 "the ${model} model's data" python -m pqm.families prepare "${family_opts[@]}"
run_stage 4 "train or load the ${model} model" python -m pqm.families train "${family_opts[@]}"
run_stage 5 "NF4 quantisation" python -m pqm.quantize --fp-dir "${expdir}/fp" --out "${expdir}/nf4" \
    --blocksize "${nf4_blocksize}" --double-quant "${nf4_double_quant}" --min-conv-numel "${nf4_min_conv_numel}" \
    --embeddings "${nf4_embeddings}" --unquantised-dtype "${nf4_unquantised_dtype}" --device "${device}"
run_stage 6 "speaker adaptive training (SAT LoRA)" stage6
run_stage 7 "per-speaker LoRA adaptation" stage7
run_stage 8 "decoding" stage8
run_stage 9 "scoring" python -m pqm.score --expdir "${expdir}" --cuts "$(cuts eval)" --model "${model}" --corpus "${corpus}" \
    --adapt-cuts "$(cuts adapt)" --adapt-utts "${sa_utts}" --adapt-holdout "${sa_holdout}"
log "finished stages ${stage}..${stop_stage}; results: ${expdir}/results.json, ${expdir}/RESULTS.md"

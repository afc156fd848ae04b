#!/usr/bin/env bash
# pqm recipe: personalised NF4 ASR. Default: connected digits (FSDD); --corpus speechocean762|librispeech|tedlium3|custom (egs/<corpus>).
#   1 corpus  2 lhotse manifests  3 ESPnet data, tokens + stats  4 train/load the model
#   5 NF4  6 SAT LoRA  7 per-speaker LoRA  8 decode all systems  9 score
# Usage: ./run.sh [--stage N] [--stop-stage M] [--nj J] [--option value ...]
set -euo pipefail
cd "$(dirname "$0")"

# Options (each can be given as --name-with-dashes value)
stage=1                 # first stage to run
stop_stage=9            # last stage to run
nj=2                    # parallel jobs for per-speaker work (stages 7, 8)
threads=0               # threads per job (0: cores / jobs); passed to ${cmd} as Kaldi's --num-threads
expdir=""               # experiment folder (default: exp/<corpus>_<model>)
datadir=data            # data folder (manifests, audio, Kaldi dirs)
model=conformer         # model family: conformer (ESPnet, trained in stage 4) or whisper (transformers, --pretrained)
pretrained=""           # conformer: ESPnet model folder to load instead of training; whisper: a Whisper folder or model name
seed=0                  # random seed for data, training and adaptation
device=cpu              # cpu or cuda
ngpu=1                  # with --device cuda: GPUs for training (stage 4: ESPnet's multi-GPU; stage 6: torchrun)
sat_nproc=0             # stage 6 processes under torchrun with DDP (0: ngpu on cuda, 1 on cpu; >1 on cpu uses gloo)
corpus=fsdd             # fsdd (the default digit task), speechocean762, librispeech, tedlium3 or custom (--train-data, --adapt-data, --eval-data)
speechocean_dir=../shared/corpora/speechocean762  # speechocean762: the corpus folder (train/, test/, WAVE/)
librispeech_dir=downloads/LibriSpeech  # librispeech: the corpus folder; downloaded into download_dir when absent
train_part=train-clean-100   # librispeech: SAT (and Conformer training) part
test_parts="test-clean test-other"  # librispeech: test speakers = their readers
train_utts=0            # librispeech, tedlium3: first N training utterances by id (0: all)
tedlium_dir=downloads/TEDLIUM_release-3  # tedlium3: the corpus folder (with legacy/); downloaded into download_dir when absent
train_data=""           # custom: training set, a Kaldi data dir (wav.scp, text, utt2spk[, segments]) or lhotse cuts
adapt_data=""           # custom: the test speakers' adaptation set
eval_data=""            # custom: the test speakers' evaluation set (its speakers are the test speakers)
valid_fraction=0.05     # custom: share of the training utterances held out for validation
fsdd_dir=../shared/corpora/fsdd   # local FSDD copy; downloaded into download_dir when absent
download_dir=downloads
train_speakers="jackson theo yweweler lucas"
test_speakers="george nicolas"
train_per_speaker=350   # training utterances drawn per training speaker
adapt_per_digit=20      # test speakers: recordings with index < this are for adaptation, the rest for evaluation
adapt_per_speaker=100   # adaptation utterances drawn per test speaker
max_digits=7            # digits per utterance: 1..max_digits
train_config=conf/train_conformer.yaml
token_type=""           # conformer tokens: word or bpe (sentencepiece unigram); default: word for fsdd, bpe otherwise
nbpe=500                # token_type bpe: vocabulary size
max_epoch=12            # Conformer training epochs
nf4_blocksize=64
nf4_double_quant=true
nf4_min_conv_numel=2048 # quantise convolutions with at least this many weights
nf4_embeddings=false    # whisper: also quantise the token embedding and the output projection tied to it
lora_r=8
lora_alpha=16
lora_targets=""         # regex over module names (default: the model family's DEFAULT_TARGETS, pqm/families/)
sat_epochs=1
sat_lr=0.001
sat_utts=0              # SAT on at most this many training utterances (0: all)
sa_epochs=10
sa_lr=0.001
sa_holdout=0            # do no harm: hold out each test speaker's last N adaptation utterances, keep the best epoch
                        # only if no worse there than the starting adapter (else fall back to it); 0: off
whisper_window=padded   # whisper LoRA training (and the adapted systems' decoding): padded (30 s) or trimmed input
target_style=corpus     # whisper LoRA targets: corpus (as is), sentence or model (restyled: pqm/restyle.py)
whisper_max_tokens_per_second=0  # whisper decoding: stop a hypothesis at this many tokens per second of audio + 8
                        # (a looping one otherwise runs to 128 tokens at each fallback temperature); 0: off
beam_size=4
ctc_weight=0.5           # CTC weight in joint decoding (chosen on the valid set of training speakers)
cmd_backend=local       # local or slurm (see cmd.sh)
cluster_config=conf/slurm.yaml  # slurm backend: partition, time, memory, CPUs, GPUs per task
# End of options

cmdline="$0 $*"
. ./local/parse_options.sh
. ./path.sh
. ./cmd.sh

log() { echo "$(date '+%Y-%m-%dT%H:%M:%S') (run.sh:${BASH_LINENO[0]}) $*"; }
die() { log "ERROR: $*" >&2; exit 1; }
need() { [ -e "$1" ] || die "missing $1: run $2 first (./run.sh --stage ${2#stage } --stop-stage ${2#stage } with the options you ran with: ${expdir}/run.cmd)"; }

case "${model}" in
    conformer) ;;
    whisper) [ -n "${pretrained}" ] || die "--model whisper needs --pretrained (a Whisper folder such as ../shared/models/whisper-tiny.en, or a model name)" ;;
    *) die "--model ${model}: use conformer or whisper" ;;
esac
expdir=${expdir:-exp/${corpus}_${model}}
case "${corpus}" in
    fsdd|speechocean762|librispeech|tedlium3) ;;
    custom) for opt in train_data adapt_data eval_data; do
                [ -e "${!opt}" ] || die "--corpus custom needs --${opt//_/-} (a Kaldi data dir or lhotse cuts); got '${!opt}'"
            done ;;
    *) die "--corpus ${corpus}: use fsdd, speechocean762, librispeech, tedlium3 or custom" ;;
esac
token_type=${token_type:-$([ "${corpus}" = fsdd ] && echo word || echo bpe)}
case "${token_type}" in
    word) token_dir=${datadir}/token_list/word ;;
    bpe) token_dir=${datadir}/token_list/bpe_unigram${nbpe} ;;
    *) die "--token-type ${token_type}: use word or bpe" ;;
esac
if [ "${corpus}" = tedlium3 ] && ! command -v sph2pipe > /dev/null; then
    # lhotse reads .sph with sph2pipe; without it, libsndfile reads TED-LIUM's uncompressed NIST SPHERE files.
    export LHOTSE_AUDIO_BACKEND=LibsndfileBackend
fi
[[ "${stage}" =~ ^[1-9]$ && "${stop_stage}" =~ ^[1-9]$ ]] || die "--stage/--stop-stage must be 1..9"
for opt in nj ngpu; do
    [[ "${!opt}" =~ ^[1-9][0-9]*$ ]] || die "--${opt} ${!opt}: a positive integer is needed"
done
for opt in threads sat_nproc sa_holdout; do
    [[ "${!opt}" =~ ^[0-9]+$ ]] || die "--${opt//_/-} ${!opt}: a number >= 0 is needed"
done
for opt in sat_epochs sa_epochs lora_r lora_alpha beam_size; do
    [[ "${!opt}" =~ ^[1-9][0-9]*$ ]] || die "--${opt//_/-} ${!opt}: a positive integer is needed"
done
for opt in nf4_double_quant nf4_embeddings; do
    case "${!opt}" in true|false) ;; *) die "--${opt//_/-} ${!opt}: use true or false" ;; esac
done
[[ "${whisper_max_tokens_per_second}" =~ ^[0-9]+([.][0-9]+)?$ ]] \
    || die "--whisper-max-tokens-per-second ${whisper_max_tokens_per_second}: a number >= 0 is needed"
case "${whisper_window}" in padded|trimmed) ;; *) die "--whisper-window ${whisper_window}: use padded or trimmed" ;; esac
case "${target_style}" in corpus|sentence|model) ;; *) die "--target-style ${target_style}: use corpus, sentence or model" ;; esac
case "${cmd_backend}" in
    local) ;;
    slurm) python -m pqm.slurm --check "${cluster_config}" || die "--cmd-backend slurm: fix the above first" ;;
    *) die "--cmd-backend ${cmd_backend}: use local or slurm" ;;
esac
[ -z "${pretrained}" ] || [ "${model}" = whisper ] || [ -d "${pretrained}" ] || die "--pretrained ${pretrained}: no such folder"
if [ "${model}" = whisper ] && [ ! -d "${pretrained}" ] && ! [[ "${pretrained}" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$ ]]; then
    die "--pretrained ${pretrained}: no such folder, and not a Hugging Face model name (owner/name, e.g. openai/whisper-tiny.en)"
fi
mkdir -p "${expdir}/log" "${expdir}/timing" "${datadir}"
echo "${cmdline}" >> "${expdir}/run.cmd"
done_dir=${expdir}/.done
mkdir -p "${done_dir}"

# What each stage's outputs depend on. A done marker records the options of stages 1..N;
# a stage whose record differs from this run's options is redone (with the later ones).
table_digest() {  # the Kaldi tables (or cuts file) of each data set: an edited file counts as a changed option
    local d f
    for d in "$@"; do
        if [ -f "${d}" ]; then cat "${d}"; continue; fi
        for f in wav.scp text utt2spk segments; do [ ! -f "${d}/${f}" ] || cat "${d}/${f}"; done
    done | sha256sum | cut -c1-16
}
data_tables=""
[ "${corpus}" != custom ] || data_tables=$(table_digest "${train_data}" "${adapt_data}" "${eval_data}")
stage_inputs=(
    [1]="corpus datadir download_dir fsdd_dir speechocean_dir librispeech_dir tedlium_dir train_data adapt_data eval_data data_tables"
    [2]="train_speakers test_speakers train_per_speaker adapt_per_digit adapt_per_speaker max_digits seed train_part test_parts train_utts valid_fraction"
    [3]="model pretrained token_type nbpe train_config"
    [4]="max_epoch"
    [5]="nf4_blocksize nf4_double_quant nf4_min_conv_numel nf4_embeddings"
    [6]="lora_r lora_alpha lora_targets whisper_window target_style sat_epochs sat_lr sat_utts sat_nproc"
    [7]="sa_epochs sa_lr sa_holdout ctc_weight"
    [8]="beam_size whisper_max_tokens_per_second"
    [9]=""
)
stage_options() {  # the options stages 1..$1 depend on, one "--name value" a line
    local n v
    for n in $(seq 1 "$1"); do
        for v in ${stage_inputs[n]}; do
            if [ "${v}" = data_tables ]; then echo "custom data tables ${data_tables}"; else echo "--${v//_/-} ${!v}"; fi
        done
    done
}
options_changed() {  # empty when stage $1's done marker records this run's options, else "was ...; now ..."
    local marker=${done_dir}/stage$1 was now
    [ -s "${marker}" ] || return 0  # no marker, or an empty one (an older pqm's): nothing recorded
    was=$(diff "${marker}" <(stage_options "$1") | sed -n 's/^< //p' | paste -sd' ') || true
    now=$(diff "${marker}" <(stage_options "$1") | sed -n 's/^> //p' | paste -sd' ') || true
    [ -z "${was}${now}" ] || echo "was ${was:-(unset)}; now ${now:-(unset)}"
}
manifests=${datadir}/manifests
cuts() { echo "${manifests}/${corpus}_cuts_$1.jsonl.gz"; }  # stage 2's lhotse cuts of set $1
speaker_list=${expdir}/test_speakers.txt
thread_opts=()  # Kaldi's --num-threads; without it pqm.launch gives each job cores / jobs
[ "${threads}" -eq 0 ] || thread_opts=(--num-threads "${threads}")
opts_nf4=(--fp-dir "${expdir}/fp" --nf4-dir "${expdir}/nf4" --device "${device}")
opts_lora=(--lora-r "${lora_r}" --lora-alpha "${lora_alpha}" --lora-targets "${lora_targets}" --seed "${seed}"
    --window "${whisper_window}" --target-style "${target_style}")

# run_stage N "title" function: runs a stage unless its done marker exists,
# logs to ${expdir}/log/stageN.log, records its wall time, invalidates later stages.
run_stage() {
    local n=$1 title=$2 fn=$3
    if [ "${stage}" -gt "${n}" ] || [ "${stop_stage}" -lt "${n}" ]; then return 0; fi
    local changed
    changed=$(options_changed "${n}")
    if [ -f "${done_dir}/stage${n}" ] && [ -z "${changed}" ]; then
        log "Stage ${n}: ${title}: already done (remove ${done_dir}/stage${n} to redo)"
        return 0
    fi
    [ -z "${changed}" ] || log "Stage ${n}: options changed since it was done (${changed}): redoing it and the later stages"
    log "Stage ${n}: ${title}"
    local start=${SECONDS}
    local later rc
    PQM_STAGE_START=$(date +%s.%N)  # lets stage 9 report its own wall time
    export PQM_STAGE_START
    for later in $(seq $((n + 1)) 9); do rm -f "${done_dir}/stage${later}"; done
    set +e
    ( set -e; "${fn}" ) 2>&1 | tee "${expdir}/log/stage${n}.log"
    rc=${PIPESTATUS[0]}
    set -e
    [ "${rc}" -eq 0 ] || die "stage ${n} failed; see ${expdir}/log/stage${n}.log"
    echo $((SECONDS - start)) > "${expdir}/timing/stage${n}.seconds"
    stage_options "${n}" > "${done_dir}/stage${n}"
    log "Stage ${n} done in $((SECONDS - start)) s"
}

stage1() {
    if [ "${corpus}" = custom ]; then
        log "corpus: train ${train_data}, adapt ${adapt_data}, eval ${eval_data}"
        return
    fi
    if [ "${corpus}" = librispeech ]; then
        log "corpus: ${librispeech_dir} (stage 2 downloads ${train_part} ${test_parts} into ${download_dir} if it is absent)"
        return
    fi
    if [ "${corpus}" = speechocean762 ]; then
        log "corpus: ${speechocean_dir} (no download: the shared copy or the unpacked release)"
        return
    fi
    if [ "${corpus}" = tedlium3 ]; then
        log "corpus: ${tedlium_dir} (stage 2 downloads TED-LIUM 3 into ${download_dir} if it is absent)"
        [ -z "${LHOTSE_AUDIO_BACKEND:-}" ] || log "no sph2pipe on PATH: reading .sph with ${LHOTSE_AUDIO_BACKEND}"
        return
    fi
    python -m pqm.recipes.fsdd --fsdd-dir "${fsdd_dir}" --download-dir "${download_dir}" > "${datadir}/corpus_dir"
    log "corpus: $(cat "${datadir}/corpus_dir")"
}

stage2() {
    if [ "${corpus}" = custom ]; then
        python -m pqm.recipes.custom --train "${train_data}" --adapt "${adapt_data}" --eval "${eval_data}" \
            --datadir "${datadir}" --valid-fraction "${valid_fraction}"
        return
    fi
    if [ "${corpus}" = librispeech ]; then
        # shellcheck disable=SC2086
        python -m pqm.recipes.librispeech --corpus-dir "${librispeech_dir}" --download-dir "${download_dir}" \
            --datadir "${datadir}" --train-part "${train_part}" --test-parts ${test_parts} \
            --train-utts "${train_utts}" --adapt-per-speaker "${adapt_per_speaker}"
        return
    fi
    if [ "${corpus}" = speechocean762 ]; then
        python -m pqm.recipes.speechocean762 --corpus-dir "${speechocean_dir}" --datadir "${datadir}" \
            --train-utts "${train_utts}" --adapt-per-speaker "${adapt_per_speaker}"
        return
    fi
    if [ "${corpus}" = tedlium3 ]; then
        python -m pqm.recipes.tedlium3 --corpus-dir "${tedlium_dir}" --download-dir "${download_dir}" \
            --datadir "${datadir}" --train-utts "${train_utts}" --adapt-per-speaker "${adapt_per_speaker}"
        return
    fi
    need "${datadir}/corpus_dir" "stage 1"
    # shellcheck disable=SC2086
    python -m pqm.recipes.connected_digits --corpus-dir "$(cat "${datadir}/corpus_dir")" --datadir "${datadir}" \
        --train-speakers ${train_speakers} --test-speakers ${test_speakers} \
        --train-per-speaker "${train_per_speaker}" --adapt-per-digit "${adapt_per_digit}" \
        --adapt-per-speaker "${adapt_per_speaker}" --max-digits "${max_digits}" --seed "${seed}"
}

espnet_data_opts=(--use_preprocessor true --token_type "${token_type}" --token_list "${token_dir}/tokens.txt"
    --train_data_path_and_name_and_type "${datadir}/train/wav.scp,speech,sound"
    --train_data_path_and_name_and_type "${datadir}/train/text,text,text"
    --valid_data_path_and_name_and_type "${datadir}/valid/wav.scp,speech,sound"
    --valid_data_path_and_name_and_type "${datadir}/valid/text,text,text"
    --config "${train_config}" --frontend_conf fs=16k)
[ "${token_type}" = bpe ] && espnet_data_opts+=(--bpemodel "${token_dir}/bpe.model")
if [ "${device}" = cuda ]; then
    espnet_data_opts+=(--ngpu "${ngpu}")
    [ "${ngpu}" -gt 1 ] && espnet_data_opts+=(--multiprocessing_distributed true)
else
    espnet_data_opts+=(--ngpu 0)
fi
[ "${sat_nproc}" -gt 0 ] || sat_nproc=$([ "${device}" = cuda ] && echo "${ngpu}" || echo 1)
sat_launcher=(python)
[ "${sat_nproc}" -gt 1 ] && sat_launcher=(python -m torch.distributed.run --standalone --nproc-per-node "${sat_nproc}")

stage3() {
    need "$(cuts train)" "stage 2"
    if [ "${model}" = whisper ]; then
        log "Whisper brings its own tokenizer and features: nothing to prepare"
        return
    fi
    if [ -n "${pretrained}" ]; then
        log "--pretrained ${pretrained} brings its own tokens and feature statistics: nothing to prepare"
        return
    fi
    python -m pqm.espnet_data --datadir "${datadir}" --corpus "${corpus}" --token-type "${token_type}" --nbpe "${nbpe}"
    rm -rf "${expdir}/asr_stats"
    python -m espnet2.bin.asr_train --collect_stats true "${espnet_data_opts[@]}" \
        --train_shape_file "${datadir}/train/wav.scp" --valid_shape_file "${datadir}/valid/wav.scp" \
        --ngpu 0 --multiprocessing_distributed false --output_dir "${expdir}/asr_stats"
}

stage4() {
    if [ "${model}" = whisper ]; then
        python -m pqm.families.whisper --pretrained "${pretrained}" --out "${expdir}/fp"
        return
    fi
    if [ -n "${pretrained}" ]; then
        local ckpt="" candidate
        for candidate in model.safetensors valid.acc.ave.pth valid.acc.ave_10best.pth valid.acc.best.pth model.pth; do
            if [ -f "${pretrained}/${candidate}" ]; then ckpt=${pretrained}/${candidate}; break; fi
        done
        [ -n "${ckpt}" ] || die "--pretrained ${pretrained}: no model.safetensors, valid.acc.ave.pth, valid.acc.ave_10best.pth, valid.acc.best.pth or model.pth in it"
        [ -f "${pretrained}/config.yaml" ] || die "--pretrained ${pretrained}: no config.yaml (ESPnet's training config) in it"
        python -m pqm.families.espnet --config "${pretrained}/config.yaml" --checkpoint "${ckpt}" --out "${expdir}/fp"
        return
    fi
    need "${expdir}/asr_stats/train/feats_stats.npz" "stage 3"
    # ESPnet's trainer resumes from ${expdir}/asr/checkpoint.pth after an interruption.
    python -m pqm.train_conformer "${espnet_data_opts[@]}" \
        --train_shape_file "${expdir}/asr_stats/train/speech_shape" \
        --valid_shape_file "${expdir}/asr_stats/valid/speech_shape" \
        --normalize global_mvn --normalize_conf "stats_file=${expdir}/asr_stats/train/feats_stats.npz" \
        --max_epoch "${max_epoch}" --seed "${seed}" --resume true --output_dir "${expdir}/asr"
    python -m pqm.families.espnet --config "${expdir}/asr/config.yaml" \
        --checkpoint "${expdir}/asr/valid.acc.ave.pth" --out "${expdir}/fp"
}

stage5() {
    need "${expdir}/fp/model.safetensors" "stage 4"
    python -m pqm.quantize --fp-dir "${expdir}/fp" --out "${expdir}/nf4" --blocksize "${nf4_blocksize}" \
        --double-quant "${nf4_double_quant}" --min-conv-numel "${nf4_min_conv_numel}" --embeddings "${nf4_embeddings}" \
        --device "${device}"
}

stage6() {
    need "${expdir}/nf4/model.safetensors" "stage 5"
    "${sat_launcher[@]}" -m pqm.adapt "${opts_nf4[@]}" "${opts_lora[@]}" --cuts "$(cuts train)" \
        --max-utts "${sat_utts}" --epochs "${sat_epochs}" --lr "${sat_lr}" --out "${expdir}/sat"
}

test_speaker_list() {
    python -c "import json,sys; print('\n'.join(json.load(open(sys.argv[1]))['test']))" \
        "${manifests}/speakers.json" > "${speaker_list}"
    wc -l < "${speaker_list}"
}

stage7() {
    need "${expdir}/sat/adapter_model.safetensors" "stage 6"
    local n failed=""
    n=$(test_speaker_list)
    for system in pqm nf4_sa; do  # a failed speaker stops neither the other speakers nor the other system
        local init=()
        [ "${system}" = pqm ] && init=(--init "${expdir}/sat")
        log "per-speaker ${system} adapters for ${n} speakers (logs: ${expdir}/log/adapt_${system}.*.log)"
        PQM_TASK_NAMES=${speaker_list} ${cmd} --max-jobs-run "${nj}" "${thread_opts[@]}" "JOB=1:${n}" "${expdir}/log/adapt_${system}.JOB.log" \
            python -m pqm.adapt "${opts_nf4[@]}" "${opts_lora[@]}" "${init[@]}" \
            --cuts "$(cuts adapt)" --speaker-list "${speaker_list}" --job JOB \
            --epochs "${sa_epochs}" --lr "${sa_lr}" --holdout "${sa_holdout}" --ctc-weight "${ctc_weight}" \
            --out "${expdir}/adapters/${system}" || failed="${failed} ${system}"
    done
    [ -z "${failed}" ] || die "adaptation failed for some speakers of:${failed} (listed above); rerun stage 7 to redo only those"
}

stage8() {
    need "${expdir}/adapters/pqm" "stage 7"
    local n
    n=$(test_speaker_list)
    log "decoding ${n} speakers with every system (logs: ${expdir}/log/decode.*.log)"
    PQM_TASK_NAMES=${speaker_list} ${cmd} --max-jobs-run "${nj}" "${thread_opts[@]}" "JOB=1:${n}" "${expdir}/log/decode.JOB.log" \
        python -m pqm.decode "${opts_nf4[@]}" --sat-dir "${expdir}/sat" --adapter-dir "${expdir}/adapters" \
        --cuts "$(cuts eval)" --speaker-list "${speaker_list}" --job JOB \
        --beam-size "${beam_size}" --ctc-weight "${ctc_weight}" \
        --max-tokens-per-second "${whisper_max_tokens_per_second}" --out "${expdir}/decode"
}

stage9() {
    need "${expdir}/decode" "stage 8"
    python -m pqm.score --expdir "${expdir}" --cuts "$(cuts eval)" --model "${model}" --corpus "${corpus}"
}

for n in $(seq 1 $((stage - 1))); do  # a skipped stage must have been done with this run's options
    # (checked here, once every option has its final value)
    changed=$(options_changed "${n}")
    [ -z "${changed}" ] || die "stage ${n} was done with other options (${changed}): rerun from there" \
        "(./run.sh --stage ${n} with these options), or give the options it was run with (${expdir}/run.cmd)"
done
run_stage 1 "get the corpus" stage1
run_stage 2 "lhotse manifests (and the speaker split)" stage2
run_stage 3 "ESPnet data dirs, token list, feature statistics" stage3
run_stage 4 "train or load the ${model} model" stage4
run_stage 5 "NF4 quantisation" stage5
run_stage 6 "speaker adaptive training (SAT LoRA)" stage6
run_stage 7 "per-speaker LoRA adaptation" stage7
run_stage 8 "decoding" stage8
run_stage 9 "scoring" stage9
log "finished stages ${stage}..${stop_stage}; results: ${expdir}/results.json, ${expdir}/RESULTS.md"

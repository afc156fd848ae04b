#!/usr/bin/env bash
# Create or reuse the project's virtual environment (.venv) with the pinned stack.
# Idempotent: a stamp records the hash of this script and requirements.txt, and
# an up-to-date venv is reused at once. See ../shared/docs/stack-notes.md for why
# each step is as it is.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${PQM_VENV:-${root}/.venv}
stamp=${venv}/.pqm-stamp
want=$(cat "${root}/tools/setup_venv.sh" "${root}/tools/requirements.txt" "${root}/pyproject.toml" | sha256sum | cut -d' ' -f1)
if [ -f "${stamp}" ] && [ "$(cat "${stamp}")" = "${want}" ]; then
    exit 0
fi
echo "$(date '+%F %T') setting up ${venv} (one time, about 3 to 4 minutes)" >&2
python3 -m venv "${venv}"
pip="${venv}/bin/python -m pip --disable-pip-version-check -q"
# pip 24+ refuses ci_sdr's sdist (an espnet requirement with a git URL extra); keep 23.2.1.
${pip} install "pip==23.2.1"
# The CPU torch wheel lies on local disk; without the +cpu pin pip may fetch a CUDA build of
# several GB. Elsewhere set PQM_TORCH (e.g. PQM_TORCH="torch==2.13.0" for a CUDA machine).
torch_pin=${PQM_TORCH:-torch==2.13.0+cpu}
${pip} install "${torch_pin}" || { echo "setup_venv.sh: pip could not install ${torch_pin} (its error is above);" \
    "where the local CPU wheel is absent, choose a build with PQM_TORCH, e.g. PQM_TORCH='torch==2.13.0'" >&2; exit 1; }
# espnet 202511 pins setuptools<74, which torch 2.13 contradicts: install it without deps,
# then its requirements (tools/requirements.txt) minus setuptools.
${pip} install --no-deps "espnet==202511" "torchaudio==2.11.0" "ci_sdr==0.0.2"
${pip} install -r "${root}/tools/requirements.txt"
# PyPI's torchaudio is a CUDA build: with the CPU torch its compiled parts fail to load.
# Its pure-Python parts (which espnet imports) work once those libraries are gone.
if ! "${venv}/bin/python" -c "import torchaudio" 2>/dev/null; then
    rm -f "${venv}"/lib/python3*/site-packages/torchaudio/lib/*.so
fi
${pip} install --no-deps -e "${root}"
"${venv}/bin/python" -c "import espnet2.tasks.asr, bitsandbytes, peft, lhotse, jiwer, sentencepiece" 2>/dev/null \
    || { echo "setup_venv.sh: the installed stack does not import; see the error above" >&2; \
         "${venv}/bin/python" -c "import espnet2.tasks.asr, bitsandbytes, peft, lhotse, jiwer, sentencepiece"; exit 1; }
echo "${want}" > "${stamp}"
echo "$(date '+%F %T') ${venv} ready" >&2

# Source me: sets up (once) and activates the project's virtual environment.
PQM_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export PQM_ROOT
"${PQM_ROOT}/tools/setup_venv.sh" || return 1 2>/dev/null || exit 1
# shellcheck disable=SC1091
. "${PQM_VENV:-${PQM_ROOT}/.venv}/bin/activate"
export PYTHONUNBUFFERED=1
# Quiet the offline nltk download attempts that espnet's g2p import makes.
export NLTK_DATA=${NLTK_DATA:-${PQM_ROOT}/.venv/nltk_data}

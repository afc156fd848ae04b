# Kaldi-style option parsing, sourced by run.sh after its defaults are set:
# `--foo-bar value` sets the existing variable foo_bar; `--config file` sources
# a file of such assignments. An unknown option or a missing value is an error.
while [ $# -gt 0 ]; do
    case "$1" in
        --help|-h)
            echo "usage: $0 [--option value ...]; options and defaults are at the top of $0" >&2
            sed -n '/^# Options/,/^# End of options/p' "$0" | grep -v '^# \(Options\|End\)' >&2
            exit 0 ;;
        --*=*)
            set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
        --*)
            name=$(echo "${1#--}" | tr '-' '_')
            if ! [[ "${name}" =~ ^[a-z][a-z0-9_]*$ ]] || [ -z "${!name+set}" ]; then
                echo "$0: unknown option $1 (see $0 --help; a corpus's own options, such as its folder, go in" \
                    "--corpus-opts: python -m pqm.recipes --corpus NAME --help lists them)" >&2; exit 1
            fi
            if [ $# -lt 2 ]; then echo "$0: option $1 needs a value" >&2; exit 1; fi
            if [ "${name}" = config ]; then
                [ -f "$2" ] || { echo "$0: --config $2: no such file" >&2; exit 1; }
                # shellcheck disable=SC1090
                . "$2"
            fi
            printf -v "${name}" '%s' "$2"
            shift 2 ;;
        *)
            echo "$0: unexpected argument $1 (options look like --name value)" >&2; exit 1 ;;
    esac
done

# Shared helpers of the bigticket sbatch scripts (sourced, never run).
# Expects: BIGTICKET_HOME (the repository), PYTHON (the venv's interpreter), DRY_RUN (0|1).

# The job's identity; outside SLURM (DRY_RUN=1 on a login node) a stand-in keeps the output readable.
JOB_ID=${SLURM_JOB_ID:-dryrun}

log() { printf '%s [%s] %s\n' "$(date -u +%H:%M:%S)" "${SLURM_JOB_NAME:-bigticket}" "$*" >&2; }
die() { log "error: $*"; exit 2; }

# Print a command (shell-quoted, so it can be pasted) when DRY_RUN=1, else run it.
run() {
    if [ "${DRY_RUN:-0}" = 1 ]; then
        printf '+'; printf ' %q' "$@"; printf '\n'
    else
        "$@"
    fi
}

# Same as run, in the background; sets LAST_PID (empty under DRY_RUN).
run_bg() {
    LAST_PID=""
    if [ "${DRY_RUN:-0}" = 1 ]; then
        printf '+'; printf ' %q' "$@"; printf ' &\n'
    else
        "$@" &
        LAST_PID=$!
    fi
}

check_python() {
    [ -x "$PYTHON" ] || die "PYTHON=$PYTHON is not an executable (set PYTHON to the venv's python)"
}

# The allocation's node names, one per line (the local host outside SLURM).
job_nodes() {
    if [ -n "${SLURM_JOB_NODELIST:-}" ]; then
        scontrol show hostnames "$SLURM_JOB_NODELIST"
    else
        hostname -s
    fi
}

# The address SLURM itself uses to reach a node (NodeAddr), so no extra name must resolve.
node_addr() {
    local addr=""
    if command -v scontrol >/dev/null 2>&1 && [ -n "${SLURM_JOB_ID:-}" ]; then
        addr=$(scontrol show node "$1" 2>/dev/null | tr ' ' '\n' | sed -n 's/^NodeAddr=//p' | head -n1)
    fi
    printf '%s\n' "${addr:-$1}"
}

# Run a command whose last stdout line is a path (`bigticket train dense` prints its run directory,
# `bigticket lottery plan` its grid) and, when RESULT_FILE is set, save that line there atomically
# for the next job of a pipeline. stdout is still shown.
run_saving_path() {
    if [ -z "${RESULT_FILE:-}" ] || [ "${DRY_RUN:-0}" = 1 ]; then
        run "$@"
        [ -n "${RESULT_FILE:-}" ] && printf '+ (last output line saved to %q)\n' "$RESULT_FILE"
        return 0
    fi
    local out rc
    out=$(mktemp "${RESULT_FILE}.out.XXXXXX")
    "$@" | tee "$out"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ]; then
        tail -n1 "$out" > "$out.last" && mv -f "$out.last" "$RESULT_FILE"
    fi
    rm -f "$out" "$out.last"
    return "$rc"
}

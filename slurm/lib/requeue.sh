# Run a command so that SLURM's pre-timeout signal ends it cleanly and requeues the job
# (sourced by lottery_mpi.sbatch and lottery_array.sbatch; needs common.sh).
#
# With `#SBATCH --signal=B:USR1@120 --requeue`, SLURM signals this batch shell 120 s before the
# time limit. We forward SIGTERM to the launcher (mpiexec forwards it to every rank), wait for it,
# and requeue: the job starts again later with the same command, and the grid scheduler skips the
# points whose result files exist. Points that were running are run again from their start; their
# claims belong to dead processes and are taken over (at once on the same host, after
# --stale-after elsewhere). Results are written atomically, so nothing is lost or duplicated.

REQUEUE_CHILD=""

_requeue_now() {
    log "pre-timeout signal (restart ${SLURM_RESTART_COUNT:-0}): stopping and requeueing job $JOB_ID"
    if [ -n "$REQUEUE_CHILD" ]; then
        kill -TERM "$REQUEUE_CHILD" 2>/dev/null || true
        wait "$REQUEUE_CHILD" 2>/dev/null || true
    fi
    # An array element is requeued on its own (SLURM_JOB_ID is the element's id).
    run scontrol requeue "$JOB_ID" || log "scontrol requeue $JOB_ID failed"
    exit 0
}

run_requeueable() {
    log "restart count ${SLURM_RESTART_COUNT:-0}: $*"
    trap _requeue_now USR1
    run_bg "$@"
    [ "${DRY_RUN:-0}" = 1 ] && return 0
    REQUEUE_CHILD=$LAST_PID
    local rc
    # `wait` returns early when a trapped signal arrives; the trap handler then exits the script.
    wait "$REQUEUE_CHILD"
    rc=$?
    REQUEUE_CHILD=""
    return "$rc"
}

# Run a command so that SLURM's pre-timeout signal ends it cleanly and requeues the job
# (sourced by lottery_mpi.sbatch and lottery_array.sbatch; needs common.sh).
#
# With `#SBATCH --signal=B:USR1@120 --requeue`, SLURM signals this batch shell 120 s before the
# time limit. We forward SIGTERM to the launcher (mpiexec forwards it to every rank; a job-array
# element runs python directly), wait for it, and requeue. On SIGTERM every running grid point
# stops after its current batch, keeping its last complete epoch under partial/<task_id>/, gives
# its claim back and `lottery run` exits with status 75; the requeued job runs the same command,
# skips points whose result files exist and resumes the others from their saved epoch. A launch
# that exits 75 on its own (signalled directly, e.g. `--signal=TERM@120` without `B:`) is
# requeued too. The 120 s must cover one training batch plus one save of a point's state.

REQUEUE_CHILD=""
EXIT_PREEMPTED=75   # lottery.grid.scheduler.EXIT_PREEMPTED

_requeue() {
    # An array element is requeued on its own (SLURM_JOB_ID is the element's id).
    run scontrol requeue "$JOB_ID" || log "scontrol requeue $JOB_ID failed"
    exit 0
}

_requeue_now() {
    log "pre-timeout signal (restart ${SLURM_RESTART_COUNT:-0}): stopping and requeueing job $JOB_ID"
    local rc=0
    if [ -n "$REQUEUE_CHILD" ]; then
        kill -TERM "$REQUEUE_CHILD" 2>/dev/null || true
        wait "$REQUEUE_CHILD" 2>/dev/null
        rc=$?
    fi
    log "launcher exited with status $rc (75: running points saved their last complete epoch)"
    _requeue
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
    if [ "$rc" -eq "$EXIT_PREEMPTED" ]; then
        log "the launch was stopped on request (status $rc): requeueing job $JOB_ID"
        _requeue
    fi
    return "$rc"
}

# A Spark standalone cluster inside a SLURM allocation (sourced by etl.sbatch, train_elephas.sbatch).
#
#   spark_cluster_start    master on the first node, one worker per node (srun), waits for them
#   spark_submit ARGS...   spark-submit against that master with the job's security settings
#   SPARK_SUBMIT           that spark-submit command as an array, for wrappers such as
#                          run_saving_path "${SPARK_SUBMIT[@]}" ARGS... (dry runs print it whole)
#   spark_cluster_stop     stops exactly the processes started here (installed as an EXIT trap)
#
# Settings (environment, defaults below): SPARK_MASTER_PORT (a first choice: when another process
# holds it, the master takes the next free one and the workers and spark-submit follow it),
# SPARK_WORKER_MEMORY, SPARK_SCRATCH
# (node-local), SPARK_JOB_DIR (must be visible on every node: holds the per-job secret),
# GPUS_PER_NODE (0 = CPU nodes, no GPU resources), GPU_DISCOVERY_SCRIPT, SPARK_START_TIMEOUT.
# Security: spark.authenticate with a fresh secret per job, kept in a 0600 properties file (never
# on a command line, where `ps` would show it); every daemon binds to its node's SLURM NodeAddr;
# the REST submission server is off.

# shellcheck source=common.sh
. "$BIGTICKET_HOME/slurm/lib/common.sh"

: "${SPARK_MASTER_PORT:=$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"  # per job: jobs can share a node
: "${SPARK_WORKER_MEMORY:=$(( ${SLURM_MEM_PER_NODE:-4096} * 9 / 10 ))m}"
: "${SPARK_SCRATCH:=${TMPDIR:-/tmp}}"
: "${SPARK_JOB_DIR:=$HOME/.bigticket/spark-$JOB_ID}"
: "${GPUS_PER_NODE:=0}"
: "${GPU_DISCOVERY_SCRIPT:=$BIGTICKET_HOME/train/gpu_discovery.sh}"
: "${SPARK_START_TIMEOUT:=120}"
export BIGTICKET_HOME SPARK_SCRATCH  # read by spark_worker.sh on every node

SPARK_MASTER_PID=""
SPARK_WORKERS_PID=""

spark_home() {
    "$PYTHON" -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))'
}

_spark_write_properties() {
    # umask first: the file holding the secret is never readable by anyone else, not even briefly.
    (umask 077 && mkdir -p "$SPARK_JOB_DIR")
    local secret
    secret=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
    (umask 077 && cat > "$SPARK_PROPS" <<EOF
spark.authenticate true
spark.authenticate.secret $secret
spark.master.rest.enabled false
spark.ui.enabled false
spark.ui.showConsoleProgress false
spark.pyspark.python $PYTHON
spark.pyspark.driver.python $PYTHON
spark.local.dir $SPARK_LOCAL_DIRS
EOF
    )
    if [ "$GPUS_PER_NODE" -gt 0 ]; then
        # Worker side: what each worker offers. Application side: one executor per node with all
        # of its GPUs, one GPU per training task.
        cat >> "$SPARK_PROPS" <<EOF
spark.worker.resource.gpu.amount $GPUS_PER_NODE
spark.worker.resource.gpu.discoveryScript $GPU_DISCOVERY_SCRIPT
spark.executor.resource.gpu.amount $GPUS_PER_NODE
spark.executor.resource.gpu.discoveryScript $GPU_DISCOVERY_SCRIPT
spark.task.resource.gpu.amount 1
EOF
    fi
}

_spark_wait_port() {  # host port timeout
    local deadline=$((SECONDS + $3))
    until (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; do
        [ -n "$SPARK_MASTER_PID" ] && ! kill -0 "$SPARK_MASTER_PID" 2>/dev/null &&
            die "the Spark master exited; see $SPARK_JOB_DIR/master.log"
        [ "$SECONDS" -ge "$deadline" ] && die "the Spark master did not listen on $1:$2 within $3s"
        sleep 1
    done
}

_spark_master_listening() {  # timeout: sets SPARK_MASTER_PORT/URL to where the master listens
    # Spark moves a master whose port is taken (by any process on a shared node) to the next one
    # without failing; the workers and the driver must follow it, not the port asked for.
    local deadline=$((SECONDS + $1)) url
    while :; do
        url=$(grep -o 'Starting Spark master at spark://[^ ]*' "$SPARK_JOB_DIR/master.log" 2>/dev/null |
              head -n1 | sed 's/^Starting Spark master at //' || true)
        [ -n "$url" ] && break
        kill -0 "$SPARK_MASTER_PID" 2>/dev/null || die "the Spark master exited; see $SPARK_JOB_DIR/master.log"
        if [ "$SECONDS" -ge "$deadline" ]; then
            # A log level above INFO hides the line: keep the port asked for if it answers.
            (exec 3<>"/dev/tcp/$SPARK_MASTER_HOST/$SPARK_MASTER_PORT") 2>/dev/null ||
                die "the Spark master did not start within $1s; see $SPARK_JOB_DIR/master.log"
            log "warning: $SPARK_JOB_DIR/master.log names no address; assuming $SPARK_MASTER_URL"
            return 0
        fi
        sleep 1
    done
    if [ "$url" != "$SPARK_MASTER_URL" ]; then
        log "port $SPARK_MASTER_PORT was taken: the Spark master listens at $url"
        SPARK_MASTER_URL=$url
        SPARK_MASTER_PORT=${url##*:}
        SPARK_SUBMIT=("$SPARK_HOME/bin/spark-submit" --master "$SPARK_MASTER_URL" --properties-file "$SPARK_PROPS")
    fi
}

_spark_wait_workers() {  # expected timeout: the master log names each registered worker
    local deadline=$((SECONDS + $2)) n=0
    while :; do
        n=$(grep -c 'Registering worker' "$SPARK_JOB_DIR/master.log" 2>/dev/null || true)
        [ "${n:-0}" -ge "$1" ] && return 0
        [ -n "$SPARK_WORKERS_PID" ] && ! kill -0 "$SPARK_WORKERS_PID" 2>/dev/null &&
            die "the Spark workers exited; see $SPARK_JOB_DIR/worker-*.log"
        [ "$SECONDS" -ge "$deadline" ] && die "only ${n:-0} of $1 Spark workers registered within $2s"
        sleep 1
    done
}

spark_cluster_start() {
    check_python
    SPARK_HOME=$(spark_home) || die "pyspark is not importable by $PYTHON"
    export SPARK_HOME
    local nodes first
    nodes=$(job_nodes)
    first=$(printf '%s\n' "$nodes" | head -n1)
    SPARK_NODE_COUNT=$(printf '%s\n' "$nodes" | wc -l)
    SPARK_MASTER_HOST=$(node_addr "$first")
    SPARK_MASTER_URL="spark://$SPARK_MASTER_HOST:$SPARK_MASTER_PORT"
    SPARK_PROPS="$SPARK_JOB_DIR/spark.properties"
    SPARK_SUBMIT=("$SPARK_HOME/bin/spark-submit" --master "$SPARK_MASTER_URL" --properties-file "$SPARK_PROPS")
    # The driver runs here, on the first node: bind it (and its scratch) like the daemons.
    export SPARK_LOCAL_IP="$SPARK_MASTER_HOST"
    export SPARK_LOCAL_DIRS="$SPARK_SCRATCH/bigticket-spark-$JOB_ID"
    export PYSPARK_PYTHON="$PYTHON" PYSPARK_DRIVER_PYTHON="$PYTHON"
    trap spark_cluster_stop EXIT
    trap 'exit 143' TERM INT  # run the EXIT trap on scancel / time limit too

    log "Spark $SPARK_MASTER_URL on $SPARK_NODE_COUNT node(s): $(printf '%s\n' "$nodes" | paste -sd,)"
    if [ "${DRY_RUN:-0}" = 1 ]; then
        printf '+ write %q (0600): spark.authenticate=true, a fresh 256-bit secret, REST server off\n' "$SPARK_PROPS"
        [ "$GPUS_PER_NODE" -gt 0 ] && printf '+   GPU resources: %s per worker and executor, 1 per task, discovery %q\n' \
            "$GPUS_PER_NODE" "$GPU_DISCOVERY_SCRIPT"
    else
        _spark_write_properties
        mkdir -p "$SPARK_LOCAL_DIRS"
    fi
    local master=("$SPARK_HOME/bin/spark-class" org.apache.spark.deploy.master.Master
        --host "$SPARK_MASTER_HOST" --port "$SPARK_MASTER_PORT" --webui-port 0
        --properties-file "$SPARK_PROPS")
    if [ "${DRY_RUN:-0}" = 1 ]; then
        printf '+'; printf ' %q' "${master[@]}"; printf ' > %q &\n' "$SPARK_JOB_DIR/master.log"
    else
        # Emptied here, not by the child's redirection: the address is read from this file at
        # once, and a job reusing SPARK_JOB_DIR must not read the previous master's.
        : > "$SPARK_JOB_DIR/master.log"
        "${master[@]}" >> "$SPARK_JOB_DIR/master.log" 2>&1 &
        SPARK_MASTER_PID=$!
        _spark_master_listening "$SPARK_START_TIMEOUT"
    fi
    # One worker per node, all of the node's CPUs; --overlap leaves the CPUs usable by later steps.
    run_bg srun --overlap --nodes="$SPARK_NODE_COUNT" --ntasks="$SPARK_NODE_COUNT" --ntasks-per-node=1 \
        --kill-on-bad-exit=0 --output="$SPARK_JOB_DIR/worker-%n.log" \
        bash "$BIGTICKET_HOME/slurm/lib/spark_worker.sh" "$SPARK_MASTER_URL" "$SPARK_PROPS" "$SPARK_WORKER_MEMORY"
    SPARK_WORKERS_PID=$LAST_PID
    if [ "${DRY_RUN:-0}" != 1 ]; then
        _spark_wait_port "$SPARK_MASTER_HOST" "$SPARK_MASTER_PORT" "$SPARK_START_TIMEOUT"
        _spark_wait_workers "$SPARK_NODE_COUNT" "$SPARK_START_TIMEOUT"
        log "Spark cluster up: $SPARK_NODE_COUNT worker(s) registered"
    fi
}

spark_submit() {
    run "${SPARK_SUBMIT[@]}" "$@"
}

spark_cluster_stop() {
    local rc=$?
    trap - EXIT TERM INT
    # srun forwards the signal to every worker task; each one stops its Worker and cleans scratch.
    for pid in $SPARK_WORKERS_PID $SPARK_MASTER_PID; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in $SPARK_WORKERS_PID $SPARK_MASTER_PID; do
        wait "$pid" 2>/dev/null || true
    done
    if [ "${DRY_RUN:-0}" != 1 ]; then
        rm -f "$SPARK_PROPS"
        # Scratch on every node, in its own step: a worker killed at the step's KillWait cannot.
        srun --overlap --nodes="$SPARK_NODE_COUNT" --ntasks-per-node=1 \
            rm -rf "$SPARK_LOCAL_DIRS" "$SPARK_LOCAL_DIRS-worker" 2>/dev/null || true
        log "Spark cluster stopped (logs in $SPARK_JOB_DIR)"
    fi
    exit "$rc"
}

# One Spark standalone worker on this node (run by srun from spark_cluster.sh, one task per node).
# Usage: bash spark_worker.sh MASTER_URL PROPERTIES_FILE MEMORY
# Binds to this node's SLURM NodeAddr, keeps Spark's temporary files in node-local scratch and
# removes them when srun forwards the stop signal.
set -u
master_url=$1 props=$2 memory=$3
. "$BIGTICKET_HOME/slurm/lib/common.sh"

node=${SLURMD_NODENAME:-$(hostname -s)}
export SPARK_LOCAL_IP
SPARK_LOCAL_IP=$(node_addr "$node")
export SPARK_LOCAL_DIRS="$SPARK_SCRATCH/bigticket-spark-$JOB_ID-worker"
export SPARK_WORKER_DIR="$SPARK_LOCAL_DIRS/work"
mkdir -p "$SPARK_WORKER_DIR"

worker_pid=""
stop() {
    [ -n "$worker_pid" ] && kill -TERM "$worker_pid" 2>/dev/null && wait "$worker_pid" 2>/dev/null
    rm -rf "$SPARK_LOCAL_DIRS"
    exit 0
}
trap stop TERM INT

"$SPARK_HOME/bin/spark-class" org.apache.spark.deploy.worker.Worker \
    --host "$SPARK_LOCAL_IP" --webui-port 0 --work-dir "$SPARK_WORKER_DIR" \
    --cores "${SLURM_CPUS_ON_NODE:-$(nproc)}" --memory "$memory" \
    --properties-file "$props" "$master_url" &
worker_pid=$!
wait "$worker_pid"
rc=$?
rm -rf "$SPARK_LOCAL_DIRS"
exit "$rc"

#!/usr/bin/env bash
# Spark GPU discovery script (spark.{driver,executor}.resource.gpu.discoveryScript).
# Prints the GPUs this executor may use as {"name":"gpu","addresses":["0",...]} on stdout.
# An allocation that already restricts the devices (SLURM sets CUDA_VISIBLE_DEVICES for --gres)
# wins over nvidia-smi's list of every GPU on the node; a CPU-only host prints an empty list,
# so the same script works everywhere.
set -u

ids=""
if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then  # set but empty: no GPU allowed
    ids=$(printf '%s\n' "$CUDA_VISIBLE_DEVICES" | tr ',' '\n')
elif command -v nvidia-smi >/dev/null 2>&1; then
    ids=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null || true)
fi

addresses=""
while IFS= read -r id; do
    id=$(printf '%s' "$id" | tr -d '[:space:]')
    # Only plain indexes or GPU/MIG UUIDs: anything else ("-1", SLURM's "NoDevFiles", error
    # text) is not an address.
    case "$id" in
        *[!A-Za-z0-9-]*) continue ;;
        GPU-?*|MIG-?*) ;;
        ''|*[!0-9]*) continue ;;
    esac
    addresses="${addresses:+$addresses,}\"$id\""
done <<< "$ids"

printf '{"name":"gpu","addresses":[%s]}\n' "$addresses"

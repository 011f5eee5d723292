#!/usr/bin/env bash
# Train on a SLURM allocation: one torchrun per node starts a worker per GPU; a requeued job
# resumes from its checkpoint; every run stops with a checkpoint before the allocation ends.
#
#   sbatch scripts/slurm_train.sh configs/gpt2_124m.json [more train.py flags]
#
# Environment (all optional): OUT_DIR (default models/<config name>), GPUS_PER_NODE (default:
# the GPUs SLURM gave the node), MARGIN_S (seconds kept free before the time limit for the
# last step, the save and the exit; default 300), REQUEUE (1: queue the job again when it
# stopped for time; default 1), RDZV_PORT (default 29500).
#
#SBATCH --job-name=gpt-train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%j.out
set -euo pipefail

CONFIG=${1:?usage: sbatch scripts/slurm_train.sh CONFIG [train.py flags]}
shift
OUT_DIR=${OUT_DIR:-models/$(basename "$CONFIG" .json)}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
MARGIN_S=${MARGIN_S:-300}
REQUEUE=${REQUEUE:-1}
RDZV_PORT=${RDZV_PORT:-29500}

# Seconds until the allocation ends, from squeue's [days-][hours:]minutes:seconds; empty
# when the job has no time limit.
seconds_left() {
    local left days=0 total=0 part
    left=$(squeue -h -j "$SLURM_JOB_ID" -o %L)
    [[ "$left" =~ ^[0-9:-]+$ ]] || return 0
    if [[ "$left" == *-* ]]; then
        days=${left%%-*}
        left=${left#*-}
    fi
    IFS=: read -r -a parts <<< "$left"
    for part in "${parts[@]}"; do
        total=$(( total * 60 + 10#$part ))
    done
    echo $(( days * 86400 + total ))
}

limit=()
left=$(seconds_left)
if [[ -n "$left" ]]; then
    max_time=$(( left - MARGIN_S ))
    if (( max_time <= 0 )); then
        echo "only ${left}s left in this allocation (MARGIN_S is ${MARGIN_S}); not starting" >&2
        exit 1
    fi
    limit=(--max_time "$max_time")
fi

resume=()
if [[ -f "$OUT_DIR/ckpt.pt" ]]; then
    resume=(--resume)  # a requeued job: the newest checkpoint that verifies
    echo "resuming from $OUT_DIR (restart ${SLURM_RESTART_COUNT:-0})"
fi

head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun --kill-on-bad-exit=1 torchrun \
    --nnodes "$SLURM_JOB_NUM_NODES" --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv_backend c10d --rdzv_endpoint "$head_node:$RDZV_PORT" --rdzv_id "$SLURM_JOB_ID" \
    train.py --config "$CONFIG" --out_dir "$OUT_DIR" "${limit[@]}" "${resume[@]}" "$@"

# Stopped for time rather than finished: queue the job again, and it goes on from there.
if [[ "$REQUEUE" == 1 ]] && grep -q "to stay within" "$OUT_DIR/report.md" 2>/dev/null; then
    echo "stopped before the time limit; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi

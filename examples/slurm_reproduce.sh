#!/bin/bash
# The standard-mode methods comparison as a Slurm job array over one shared results folder.
#
#   sbatch --array=1-8 examples/slurm_reproduce.sh            # the learning-rate selection
#   sbatch --array=1-8 --dependency=afterok:JOBID examples/slurm_reproduce.sh   # the rest
#   loralab reproduce report --scale standard                  # once everything is there
#
# Each task trains every 8th run of the plan (--shard K/8) and keeps each result in
# $RESULTS/runs as it finishes. The first array trains the selection runs and exits 0
# when the runs that wait on them are missing; the second array finds the selection in
# the store, trains its share of the rest, and the task that finds the plan complete
# writes the table. A task that fails can simply run again: it trains only what is missing.
#SBATCH --job-name=loralab-methods
#SBATCH --cpus-per-task=2
#SBATCH --mem=16G
#SBATCH --time=02:00:00
set -euo pipefail

RESULTS=${RESULTS:-$PWD/results/standard}   # on a file system every node sees
EXPERIMENT=${EXPERIMENT:-methods}
COUNT=${SLURM_ARRAY_TASK_COUNT:?run this as a job array: sbatch --array=1-N}
INDEX=$(( SLURM_ARRAY_TASK_ID - ${SLURM_ARRAY_TASK_MIN:-1} + 1 ))

loralab reproduce "$EXPERIMENT" --scale standard --output-dir "$RESULTS" \
    --jobs "${SLURM_CPUS_PER_TASK:-1}" --shard "$INDEX/$COUNT"

#!/bin/bash
# moetrain job '{{name}}': {{summary}}
# Written by `moetrain launch`. The job runs {{job_yaml}} (the resolved config).
# Submit it again with: sbatch {{script}}
{{sbatch_options}}

set -eo pipefail
{{environment}}
# The first node of the allocation hosts the rendezvous; every node connects to it.
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR=$head_node
export MASTER_PORT={{master_port}}
echo "moetrain: job $SLURM_JOB_ID on $SLURM_JOB_NUM_NODES node(s) [$SLURM_JOB_NODELIST]," \
     "rendezvous $MASTER_ADDR:$MASTER_PORT, restart ${SLURM_RESTART_COUNT:-0}"

{{launch}}

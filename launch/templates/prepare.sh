#!/bin/bash
# moetrain data preparation for '{{name}}': one array task per data source ({{sources}}).
# Written by `moetrain launch` (launch.slurm.prepare); the training job waits for it (afterok).
# The job runs {{job_yaml}} (the resolved config). Submit it again with: sbatch {{script}}
{{sbatch_options}}

set -eo pipefail
{{environment}}
echo "moetrain: preparing data source $SLURM_ARRAY_TASK_ID of job $SLURM_ARRAY_JOB_ID on $(hostname)"
{{prepare}}

#!/usr/bin/env bash
#SBATCH --job-name=siamese-participant
# One task of the participant array that scripts/hpc/submit.sh submits: the subject is the task's entry of
# SIAMESE_SUBJECTS. The arguments are the app's options. Resources come from submit.sh (--cpus, --mem-gb, --time).
# Exit status: the app's (0 done, 65 a scan failed, 75 the subject is locked by another run, 143 cancelled).
set -euo pipefail
read -r -a subjects <<< "$SIAMESE_SUBJECTS"
subject=${subjects[$SLURM_ARRAY_TASK_ID]}
cpus=${SLURM_CPUS_PER_TASK:-1}
mem_gb=$(( ${SLURM_MEM_PER_NODE:-2048} / 1024 ))
echo "siamese: task $SLURM_ARRAY_TASK_ID of job $SLURM_ARRAY_JOB_ID: sub-$subject on $(hostname) ($cpus CPUs, $mem_gb GB)"
SIAMESE_SUBJECT=$subject exec "$SIAMESE_HPC_DIR/run_app.sh" participant \
    --nprocs "$cpus" --omp-nthreads "$cpus" --mem-gb "$mem_gb" "$@"

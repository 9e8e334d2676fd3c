#!/usr/bin/env bash
#SBATCH --job-name=siamese-group
# The group level, submitted by scripts/hpc/submit.sh to start after the participant array (afterany). It lists
# every scan of the dataset (a --participant-label in the options is dropped: a resubmission of a few subjects
# refreshes the group tables over all) as ok, failed or missing in group_orientation.tsv, and exits 0 while one
# scan has results.
set -euo pipefail
cpus=${SLURM_CPUS_PER_TASK:-1}
mem_gb=$(( ${SLURM_MEM_PER_NODE:-2048} / 1024 ))
echo "siamese: group job $SLURM_JOB_ID on $(hostname) ($cpus CPUs, $mem_gb GB)"
exec "$SIAMESE_HPC_DIR/run_app.sh" group --nprocs "$cpus" --omp-nthreads "$cpus" --mem-gb "$mem_gb" "$@"

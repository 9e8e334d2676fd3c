#!/usr/bin/env bash
# Submit bids-siamese to SLURM: a job array with one task per participant, then the group level, which starts
# when every task has ended (--dependency=afterany: a task that fails on a bad scan does not block it).
#
# usage: scripts/hpc/submit.sh BIDS_DIR OUTPUT_DIR [--runner apptainer|docker|podman|venv] [--image IMAGE]
#            [--work-dir DIR] [--cpus N] [--mem-gb GB] [--time HH:MM:SS] [--max-running N] [--no-group]
#            [-- APP_OPTIONS]
#
# APP_OPTIONS go to both levels (e.g. --resolution 4 --task orientation: the participant level ignores --task).
# --participant-label in APP_OPTIONS selects the array's subjects (default: every sub-* folder of BIDS_DIR).
# Prints the job ids ("participant array: ID", "group: ID"). Job logs: OUTPUT_DIR/logs/slurm/.
# Other sbatch settings come from sbatch's own variables, e.g. SBATCH_ACCOUNT, SBATCH_PARTITION, SBATCH_QOS.
# Exit codes: 0 submitted; 64 bad arguments; 66 BIDS_DIR, the image or the entry point not found;
# 69 sbatch not found or it refused a job. See docs/hpc.md.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
die() { echo "submit.sh: error: $2" >&2; exit "$1"; }
usage() { sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0; }
case "${1:-}" in -h|--help) usage ;; esac

[ $# -ge 2 ] || die 64 "BIDS_DIR and OUTPUT_DIR are required; fix: scripts/hpc/submit.sh BIDS_DIR OUTPUT_DIR [--runner venv] [-- APP_OPTIONS]"
bids=$1 out=$2
shift 2
case "$bids$out" in -*) die 64 "BIDS_DIR and OUTPUT_DIR come first; fix: scripts/hpc/submit.sh BIDS_DIR OUTPUT_DIR [options]";; esac
runner=apptainer image="" work="" cpus=2 mem_gb=6 time=01:00:00 max_running="" group=1
while [ $# -gt 0 ]; do
    case "$1" in
        --) shift; break ;;
        --no-group) group=0; shift; continue ;;
        --runner|--image|--work-dir|--cpus|--mem-gb|--time|--max-running)
            [ $# -ge 2 ] || die 64 "$1 needs a value; fix: see scripts/hpc/submit.sh --help" ;;
        -h|--help) usage ;;
        *) die 64 "unknown option '$1'; fix: put the app's options after '--' (see docs/hpc.md)" ;;
    esac
    case "$1" in
        --runner) runner=$2 ;; --image) image=$2 ;; --work-dir) work=$2 ;; --cpus) cpus=$2 ;;
        --mem-gb) mem_gb=$2 ;; --time) time=$2 ;; --max-running) max_running=$2 ;;
    esac
    shift 2
done
app_opts=("$@")

case "$runner" in apptainer|docker|podman|venv) ;; *)
    die 64 "--runner '$runner' is not one of apptainer, docker, podman, venv; fix: choose one" ;; esac
for pair in "cpus:$cpus" "mem-gb:$mem_gb" "max-running:${max_running:-1}"; do
    [[ "${pair#*:}" =~ ^[1-9][0-9]*$ ]] || die 64 "--${pair%%:*} '${pair#*:}' is not a positive integer; fix: e.g. --${pair%%:*} 2"
done
[[ "$time" =~ ^([0-9]+-)?[0-9]+(:[0-9]{2}){0,2}$ ]] || die 64 "--time '$time' is not a SLURM time; fix: e.g. --time 01:00:00"
[ -d "$bids" ] || die 66 "BIDS_DIR $bids not found; fix: give the dataset's folder"
command -v sbatch >/dev/null || die 69 "sbatch not found; fix: run this on a SLURM login node"
case "$runner" in
    venv) command -v bids-siamese >/dev/null || die 66 "bids-siamese not on PATH; fix: activate the environment it is installed in (scripts/install.sh)" ;;
    apptainer) [ -n "$image" ] && [ -f "$image" ] || die 66 "--runner apptainer needs --image FILE.sif${image:+ ($image not found)}; fix: apptainer build (docs/hpc.md)"
               image=$(cd "$(dirname "$image")" && pwd)/$(basename "$image") ;;
    docker|podman) image=${image:-bids/siamese:$(cat "$here/../../version")} ;;
esac

# the array's subjects: --participant-label in APP_OPTIONS, else every sub-* folder
subjects=() in_labels=0
for opt in "${app_opts[@]}"; do
    case "$opt" in
        --participant-label|--participant_label) in_labels=1 ;;
        --participant-label=*|--participant_label=*) in_labels=0; subjects+=("${opt#*=}") ;;
        -*) in_labels=0 ;;
        *) [ "$in_labels" = 1 ] && subjects+=("$opt") ;;
    esac
done
if [ ${#subjects[@]} -eq 0 ]; then
    for dir in "$bids"/sub-*/; do [ -d "$dir" ] && subjects+=("$(basename "$dir" | sed 's/^sub-//')"); done
fi
subjects=("${subjects[@]#sub-}")
[ ${#subjects[@]} -gt 0 ] || die 66 "no sub-* folder in $bids; fix: give a BIDS dataset"

bids=$(cd "$bids" && pwd)
mkdir -p "$out/logs/slurm" || die 64 "cannot create $out/logs/slurm; fix: choose a writable OUTPUT_DIR"
out=$(cd "$out" && pwd)
# one work dir per OUTPUT_DIR, on scratch: a resubmitted task resumes from it
work=${work:-${SCRATCH:-$HOME}/bids-siamese-work/$(basename "$out")-$(printf %s "$out" | md5sum | cut -c1-8)}
mkdir -p "$work" || die 64 "cannot create the work dir $work; fix: pass --work-dir DIR"
work=$(cd "$work" && pwd)

# the job scripts read their settings from these variables (sbatch exports the environment, --export=ALL)
export SIAMESE_HPC_DIR=$here SIAMESE_RUNNER=$runner SIAMESE_IMAGE=$image SIAMESE_BIDS_DIR=$bids \
    SIAMESE_OUTPUT_DIR=$out SIAMESE_WORK_DIR=$work SIAMESE_SUBJECTS="${subjects[*]}"
common=(--parsable --export=ALL --cpus-per-task="$cpus" --mem="${mem_gb}G" --time="$time")
array="0-$(( ${#subjects[@]} - 1 ))${max_running:+%$max_running}"
array_id=$(sbatch "${common[@]}" --array="$array" --output="$out/logs/slurm/participant_%A_%a.out" \
    "$here/participant.sh" "${app_opts[@]}") || die 69 "sbatch refused the participant array; fix: see its message above"
array_id=${array_id%%;*}
echo "participant array: $array_id (${#subjects[@]} task(s): ${subjects[*]})"
if [ "$group" = 1 ]; then
    group_id=$(sbatch "${common[@]}" --dependency="afterany:$array_id" --output="$out/logs/slurm/group_%j.out" \
        "$here/group.sh" "${app_opts[@]}") || die 69 "sbatch refused the group job; fix: see its message above"
    echo "group: ${group_id%%;*}"
fi

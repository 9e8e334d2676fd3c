#!/usr/bin/env bash
# run_app.sh LEVEL [APP_OPTIONS]: run bids-siamese at LEVEL with the runner, image and folders that
# scripts/hpc/submit.sh exported (SIAMESE_RUNNER, SIAMESE_IMAGE, SIAMESE_BIDS_DIR, SIAMESE_OUTPUT_DIR,
# SIAMESE_WORK_DIR) and, for the participant level, the subject of the array task (SIAMESE_SUBJECT).
# The app replaces this shell (exec), so SIGTERM from scancel or the time limit reaches it.
set -euo pipefail
level=$1
shift
# the participant level runs the task's subject (SIAMESE_SUBJECT), the group level every subject: drop any
# --participant-label list from the options
opts=() skip=0
for opt in "$@"; do
    case "$opt" in
        --participant-label|--participant_label) skip=1; continue ;;
        --participant-label=*|--participant_label=*) continue ;;
        -*) skip=0 ;;
    esac
    [ "$skip" = 1 ] || opts+=("$opt")
done
[ "$level" = participant ] && opts+=(--participant-label "$SIAMESE_SUBJECT")
set -- ${opts[@]+"${opts[@]}"}
case "$SIAMESE_RUNNER" in
    venv)  # the installed entry point, on the host
        exec bids-siamese "$SIAMESE_BIDS_DIR" "$SIAMESE_OUTPUT_DIR" "$level" -w "$SIAMESE_WORK_DIR" "$@" ;;
    apptainer)
        exec apptainer run --cleanenv -B "$SIAMESE_BIDS_DIR:/data:ro" -B "$SIAMESE_OUTPUT_DIR:/out" \
            -B "$SIAMESE_WORK_DIR:/work" "$SIAMESE_IMAGE" /data /out "$level" -w /work "$@" ;;
    docker)
        exec docker run --rm --user "$(id -u):$(id -g)" -v "$SIAMESE_BIDS_DIR:/data:ro" -v "$SIAMESE_OUTPUT_DIR:/out" \
            -v "$SIAMESE_WORK_DIR:/work" "$SIAMESE_IMAGE" /data /out "$level" -w /work "$@" ;;
    podman)
        exec podman run --rm --userns=keep-id -v "$SIAMESE_BIDS_DIR:/data:ro" -v "$SIAMESE_OUTPUT_DIR:/out" \
            -v "$SIAMESE_WORK_DIR:/work" "$SIAMESE_IMAGE" /data /out "$level" -w /work "$@" ;;
    *) echo "run_app.sh: error: SIAMESE_RUNNER '${SIAMESE_RUNNER:-}' is not set by submit.sh; fix: submit with scripts/hpc/submit.sh" >&2
       exit 64 ;;
esac

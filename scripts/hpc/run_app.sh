#!/usr/bin/env bash
# run_app.sh LEVEL [APP_OPTIONS]: run bids-siamese at LEVEL with the runner, image and folders that
# scripts/hpc/submit.sh exported (SIAMESE_RUNNER, SIAMESE_IMAGE, SIAMESE_BIDS_DIR, SIAMESE_OUTPUT_DIR,
# SIAMESE_WORK_DIR). The app replaces this shell (exec), so SIGTERM from scancel or the time limit reaches it.
set -euo pipefail
level=$1
shift
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

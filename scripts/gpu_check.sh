#!/usr/bin/env bash
# Every GPU check and measurement, each under its own time limit (gpu_check.py says which);
# --smoke runs the same plumbing on a CPU, --sweep the speedrun recipe's grid. Python: $PYTHON,
# else the python on PATH (the project's virtual environment, activated).
set -euo pipefail
exec "${PYTHON:-python}" "$(dirname "$0")/../gpu_check.py" "$@"

#!/usr/bin/env bash
# Re-resolve the pinned toolchain CI installs from. Run it on purpose, commit the result on its
# own ("deps: ..."), and let CI say whether the new versions pass:
#   requirements/dev.txt     every dependency, test and lint tool at the newest version allowed
#                            by pyproject.toml on the day of the lock (CI's main run)
#   requirements/lowest.txt  the lowest versions pyproject.toml claims (CI runs the tests on them
#                            too, so the ranges stay honest for users)
#   requirements/chart.txt   the chart checks' tools (tools/helm_check.py)
# Needs uv (`pip install uv`).
set -euo pipefail
cd "$(dirname "$0")/.."
common=(--python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-header --quiet)
uv pip compile pyproject.toml --extra dev "${common[@]}" -o requirements/dev.txt
uv pip compile pyproject.toml --extra dev --resolution lowest-direct "${common[@]}" \
    -o requirements/lowest.txt
uv pip compile requirements/chart.in --python-version 3.12 --python-platform x86_64-manylinux_2_28 \
    --no-header --quiet -o requirements/chart.txt

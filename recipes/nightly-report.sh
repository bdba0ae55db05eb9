#!/bin/sh
# Stand-in for the nightly report: writes one line per run into the workload's state directory.
set -eu
out="${STATE_DIRECTORY:-/tmp}/reports.log"
echo "$(date -u +%FT%TZ) report: $(curl -fsS http://127.0.0.1:8080/counts 2>/dev/null || echo 'counts unavailable')" >>"$out"

#!/usr/bin/env bash
# tests/expect_exit.sh CODE REGEX COMMAND - runs COMMAND (a bash command line) and passes when it exits with CODE
# ("nonzero": any failure that is not a crash, i.e. 1..125) and its stdout + stderr match the extended REGEX;
# a COMMAND that exits 77 skipped itself (ctest's SKIP_RETURN_CODE).
# ctest runs earn's example programs through it with bad arguments: a clear message and a clean exit, never an
# abort (134), a sanitizer report or a silent success.
set -uo pipefail
want=$1 regex=$2 cmd=$3
out=$(bash -c "$cmd" 2>&1)
rc=$?
if [ "$rc" -eq 77 ]; then  # the command's own skip (its data is absent)
  echo "skipped: $cmd"
  exit 77
fi
ok=1
if [ "$want" = nonzero ]; then
  [ "$rc" -ge 1 ] && [ "$rc" -le 125 ] || ok=0
else
  [ "$rc" -eq "$want" ] || ok=0
fi
printf '%s\n' "$out" | grep -Eq -- "$regex" || ok=0
if [ "$ok" -ne 1 ]; then
  printf 'command: %s\nexit %s (expected %s), output (expected to match /%s/):\n%s\n' "$cmd" "$rc" "$want" "$regex" \
    "$out" | head -c 20000
  exit 1
fi
echo "exit $rc as expected; output matches /$regex/"

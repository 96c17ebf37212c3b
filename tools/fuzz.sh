#!/usr/bin/env bash
# Random fuzzing: every hypothesis test in tests/ (pytest's `hypothesis` marker, which hypothesis puts on each of
# them) under the `fuzz` profile of tests/conftest.py: fresh random examples on every run, FUZZ_EXAMPLES per test
# (default 2000; tests that fix their own count keep it), no deadline. `bash tools/test.sh` runs the same tests
# derandomized, so its result depends on the commit alone; this command is where new failures are found. Keep each
# one as an `@example(...)` on the test that found it (the report prints it), so the test command replays it.
# Extra arguments go to pytest instead of the default path, e.g. `FUZZ_EXAMPLES=10000 bash tools/fuzz.sh
# tests/reliability` or `bash tools/fuzz.sh tests/reliability/test_fuzz.py -k config_json`.
source "$(dirname "$0")/env.sh"
export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-fuzz}"
export LONGCAT_LAB_SMOKE=1
echo "[longcat_lab] fuzzing with hypothesis profile $HYPOTHESIS_PROFILE, ${FUZZ_EXAMPLES:-2000} examples per test"
if [ $# -eq 0 ]; then set -- tests; fi
exec python -m pytest -m hypothesis --hypothesis-show-statistics "$@"

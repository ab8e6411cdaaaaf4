#!/usr/bin/env bash
# Runs the test suite (CPU only, no model hub). Extra arguments go to pytest, e.g. `-m slow` or `-m "not slow"`.
source "$(dirname "$0")/env.sh"
cd "$ROOT"
exec python -m pytest "$@"

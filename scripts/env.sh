# Sourced by the other scripts: creates and fills ./.venv on first use (CPU build of torch),
# refreshes it when pyproject.toml's requirements change, then activates it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VERL_TRE_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
stamp="$VENV/.verl_tre_stamp"
# Only lines that change what gets installed: editing the description or the license needs no reinstall.
want="$(grep -vE '^(description|readme|license) *=' "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  mkdir -p "$VENV"
  log="$VENV/install.log"
  echo "[env] installing torch 2.13 (CPU build), verl 0.4.1 and the pinned dependencies into $VENV:" \
       "about 2-3 minutes on first use (details: $log) ..." >&2
  started=$SECONDS
  # pip's output (index warnings, script-location notes, build chatter) goes to the log; shown only on failure.
  if ! {
    { [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"; } &&
    "$VENV/bin/pip" install --upgrade --no-warn-script-location pip &&
    # The CPU build: an unpinned torch would pull a multi-GB CUDA build.
    "$VENV/bin/pip" install --no-warn-script-location "torch==2.13.0" &&
    "$VENV/bin/pip" install --no-warn-script-location -e "$ROOT[test]"
  } >"$log" 2>&1; then
    echo "[env] installation failed; the last lines of $log:" >&2
    tail -n 25 "$log" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
  echo "[env] ready in $((SECONDS - started)) s" >&2
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1

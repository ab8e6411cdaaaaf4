# Sourced by the other scripts: creates and fills ./.venv on first use (CPU build of torch),
# refreshes it when pyproject.toml changes, then activates it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VERL_TRE_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
stamp="$VENV/.verl_tre_stamp"
want="$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[env] setting up $VENV (first use takes about two minutes)..." >&2
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip >&2
  # The CPU build: an unpinned torch would pull a multi-GB CUDA build.
  "$VENV/bin/pip" install -q "torch==2.13.0" >&2
  "$VENV/bin/pip" install -q -e "$ROOT[test]" >&2
  echo "$want" > "$stamp"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1

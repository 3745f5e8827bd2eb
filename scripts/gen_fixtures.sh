#!/usr/bin/env bash
# Regenerate every PyTorch oracle fixture under fixtures/. Needs only python3 and PyPI:
#   bash scripts/gen_fixtures.sh            # all areas
#   bash scripts/gen_fixtures.sh ops mask   # some areas (scripts/oracle/<area>.py)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ATTEND_ORACLE_VENV:-scripts/.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -r scripts/oracle/requirements.txt
fi
areas=("$@")
if [ ${#areas[@]} -eq 0 ]; then
  for f in scripts/oracle/*.py; do b=$(basename "$f" .py); [ "$b" = common ] || areas+=("$b"); done
fi
for a in "${areas[@]}"; do
  echo "oracle: $a"
  PYTHONPATH=scripts/oracle "$VENV/bin/python" "scripts/oracle/$a.py"
done

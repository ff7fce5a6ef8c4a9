#!/usr/bin/env bash
# Rebuild everything under fixtures/ end to end:
#   - the quantization test vectors (fixtures/quant/selftest.json),
#   - the three tiny checkpoints (shapes is trained: ~15 min on 2 CPU threads),
#     their accuracy / scale measurements and READMEs,
#   - their oracle traces (oracle/trace.py, D=24, K=16, full logits).
# Extra arguments go to build_fixtures.py (e.g. `tied odd` to skip the training).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=oracle/.venv/bin/python
if [ ! -x "$PY" ]; then
  python3 -m venv oracle/.venv
  oracle/.venv/bin/pip install -r oracle/requirements.txt
fi
# libgomp busy-waiting is 5-8x slower when the cores are shared; results do not change.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
"$PY" oracle/build_fixtures.py "$@"
"$PY" oracle/check_quant.py --self-test --write-vectors fixtures/quant/selftest.json > /dev/null
"$PY" oracle/check_quant.py --self-test | grep -E '^\[|self-test'
size=$(du -sb fixtures | cut -f1)
echo "fixtures/: $size bytes"
if [ "$size" -gt 15000000 ]; then
  echo "fixtures/ is over the 15 MB budget" >&2
  exit 1
fi

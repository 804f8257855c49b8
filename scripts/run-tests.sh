#!/usr/bin/env bash
# Run the whole suite. In CI (CI=true) the eBPF end-to-end tests must run:
# the run fails if any of them was skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
mkdir -p build
report=build/test-junit.xml
$PY -m pytest tests -p no:cacheprovider -rs --junitxml="$report" "$@"
rc=$?
if [ $rc -ne 0 ]; then exit $rc; fi
$PY - "$report" <<'PYEOF'
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
skipped = []
ran = 0
for case in root.iter("testcase"):
    props = {p.get("name"): p.get("value") for p in case.iter("property")}
    is_ebpf = props.get("ebpf") == "1"
    if not is_ebpf:
        continue
    if case.find("skipped") is not None:
        skipped.append(f"{case.get('classname')}::{case.get('name')}: {case.find('skipped').get('message')}")
    else:
        ran += 1
print(f"eBPF end-to-end tests run: {ran}, skipped: {len(skipped)}")
if skipped or ran == 0:
    for s in skipped:
        print("  SKIPPED eBPF test:", s)
    if ran == 0:
        print("no eBPF end-to-end test ran")
    sys.exit(1)
PYEOF

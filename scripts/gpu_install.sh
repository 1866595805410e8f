#!/usr/bin/env bash
# On the GPU machine: install one folder of wheels from scripts/gpu_wheels.sh into /tmp/site,
# without network and without touching the image's torch. Then: export PYTHONPATH=/tmp/site.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$1"/*.whl
echo "installed $(ls "$1" | wc -l) wheels from $1 into /tmp/site"

#!/usr/bin/env bash
# CI prerequisite of the dashboard test (tests/test_dashboard_browser.py): Debian's chromium and
# chromium-driver, driven by selenium with an explicit driver path (nothing is downloaded at test
# time). Installs them when missing and exits non-zero when it cannot, so CI fails here rather
# than running without the browser test.
set -euo pipefail
have() { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; }
if have; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "prereqs-browser: chromium and chromium-driver are missing and cannot be installed (needs root and apt-get)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
  || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1) \
  || { echo "prereqs-browser: apt-get could not install chromium chromium-driver" >&2; exit 1; }
have || { echo "prereqs-browser: chromium or chromedriver still not on PATH after install" >&2; exit 1; }

#!/usr/bin/env bash
# Install headless Chromium (and a font, so that text renders) for tests/workflow/test_report.py on Debian/Ubuntu.
# Idempotent: installs only the packages that are missing, and touches the network only then. Needs root or sudo.
# CI runs it before pytest; without Chromium the report test is skipped with a reason.
set -euo pipefail

PACKAGES=(chromium fonts-dejavu-core)

if ! command -v dpkg-query >/dev/null 2>&1; then
    if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
        exit 0
    fi
    echo "install_chromium.sh: not a Debian system; install Chromium by hand (the report test is skipped)" >&2
    exit 1
fi

missing=()
for package in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$package")
    fi
done
if [ "${#missing[@]}" -eq 0 ]; then
    echo "install_chromium.sh: already installed: ${PACKAGES[*]}"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
# Refresh the package lists only when apt does not know a package yet.
for package in "${missing[@]}"; do
    if ! apt-cache show "$package" >/dev/null 2>&1; then
        $SUDO apt-get update -qq
        break
    fi
done
echo "install_chromium.sh: installing ${missing[*]}"
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"

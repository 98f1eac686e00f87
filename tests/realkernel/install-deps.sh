#!/usr/bin/env bash
# Host prerequisites for the real-kernel tests (tests/realkernel/).
# Idempotent: installs only the Debian packages that are missing.
# Usage: bash tests/realkernel/install-deps.sh   (as root, or with sudo available)
set -euo pipefail

pkgs=(qemu-system-x86 busybox-static usbip kmod cpio hwdata gcc libc6-dev xz-utils)
missing=()
for p in "${pkgs[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "realkernel deps: all present"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "realkernel deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"; then
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

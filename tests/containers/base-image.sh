#!/usr/bin/env bash
# The base image the container tests build on, made offline from Debian's packages (no
# registry is reachable in CI): debootstrap once, keep the tarball under CACHE_DIR, and
# import it into podman's storage when it is not there already.
# Usage: bash tests/containers/base-image.sh IMAGE   (as root; CONTAINERS_CONF set by the caller)
set -euo pipefail

image=${1:-localhost/usbip-gateway-ci-base:bookworm}
cache_dir=${USBIP_GATEWAY_CI_CACHE:-/var/cache/usbip-gateway-ci}
tarball=$cache_dir/debian-base-bookworm.tar

if podman image exists "$image"; then
    echo "base image: $image present"
    exit 0
fi
if [ ! -s "$tarball" ]; then
    mkdir -p "$cache_dir"
    rootfs=$(mktemp -d "$cache_dir/rootfs.XXXXXX")
    trap 'rm -rf "$rootfs"' EXIT
    echo "base image: debootstrap into $rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" >"$cache_dir/debootstrap.log" 2>&1 \
        || { tail -20 "$cache_dir/debootstrap.log"; exit 1; }
    # What python:*-slim images provide, and the build host's trust store so pip and apt
    # reach their indexes through whatever this machine trusts.
    ln -sf python3 "$rootfs/usr/bin/python"
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$rootfs/etc/pip.conf"
    rm -rf "$rootfs/var/cache/apt/archives/"*.deb "$rootfs/var/lib/apt/lists/"*
    tar -C "$rootfs" -cf "$tarball.part" .
    mv "$tarball.part" "$tarball"
fi
echo "base image: importing $tarball"
podman import "$tarball" "$image" >/dev/null

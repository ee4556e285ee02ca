#!/usr/bin/env bash
# Build a Debian bookworm base image with python3 from Debian's own packages,
# for machines that can reach a Debian mirror but no container registry.
# Usage: compose/base-image.sh [TAG]   (default agentbus-base:bookworm)
# Reuses the image when it already exists; set REBUILD=1 to force.
set -euo pipefail
tag="${1:-agentbus-base:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

# An image built before the sandbox needed bubblewrap, or before pools could name a git repository, is rebuilt.
if [[ -z "${REBUILD:-}" ]] && docker image inspect "$tag" >/dev/null 2>&1; then
    if docker run --rm --network none --entrypoint /bin/sh "$tag" -c 'command -v bwrap && command -v git' >/dev/null 2>&1; then
        echo "base image $tag exists"
        exit 0
    fi
    echo "base image $tag has no bubblewrap or no git (the tool sandbox and repository pools need them): rebuilding"
fi
command -v debootstrap >/dev/null || { echo "debootstrap is not installed (apt-get install -y debootstrap)" >&2; exit 1; }

root="$(mktemp -d /tmp/agentbus-rootfs.XXXXXX)"
trap 'rm -rf "$root"' EXIT
# minbase keeps the image small; python3-venv brings ensurepip, so the
# agentbus Dockerfile can make a venv exactly as on python:3.11-slim; bubblewrap is
# the sandbox for the bash tool and the evaluator's checks (README, "Sandbox"); git is what
# agents of pools on a repository run (README, "Repositories").
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,bubblewrap,git \
    bookworm "$root" "$mirror"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    - "$tag"
echo "built base image $tag"

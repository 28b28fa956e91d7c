#!/usr/bin/env bash
# Gene Ontology for offline enrichment: Bioconductor's org.Hs.eg.db (human gene -> GO annotations, Ensembl ids,
# aliases) and GO.db (term names, is_a / part_of hierarchy), as packaged by Debian (Artistic-2.0). Both .deb files
# are pinned by version and checked by SHA-256; only their two SQLite files are kept.
#
#   scripts/install_go.sh [DEST]      DEST: $SCFM_GO_DIR, else ${XDG_CACHE_HOME:-~/.cache}/scfm/go
#
# Running it again with the files in place does nothing. Needs apt-get (Debian/Ubuntu) or curl, and dpkg-deb or ar.
set -euo pipefail

DEST=${1:-${SCFM_GO_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/scfm/go}}
MIRROR=${DEBIAN_MIRROR:-https://deb.debian.org/debian}
# package  version  sha256 of the .deb  path of the SQLite file inside it
PACKAGES=(
  "r-bioc-org.hs.eg.db 3.16.0-1 0f61810d35b858915b1a9787d8dcab08b7e164c14c20a9e1d86eb9837308c2c2 usr/lib/R/site-library/org.Hs.eg.db/extdata/org.Hs.eg.sqlite"
  "r-bioc-go.db 3.16.0-1 6cf9c43b97212811ecb7ad0d7cde12e76f984ab7494a59c02455239a9dd3243d usr/lib/R/site-library/GO.db/extdata/GO.sqlite"
)

manifest() {
  for entry in "${PACKAGES[@]}"; do
    read -r name version sha _ <<<"$entry"
    echo "$name $version $sha"
  done
}

if [ -f "$DEST/MANIFEST" ] && [ "$(cat "$DEST/MANIFEST")" = "$(manifest)" ] \
   && [ -f "$DEST/org.Hs.eg.sqlite" ] && [ -f "$DEST/GO.sqlite" ]; then
  echo "GO databases already in $DEST"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

fetch() {  # name version -> the .deb in $work
  local name=$1 version=$2 deb="$1_$2_all.deb"
  if command -v apt-get >/dev/null && (cd "$work" && apt-get download -qq "$name=$version" 2>/dev/null); then
    return
  fi
  # not Debian, or the package lists lack it: the same file from the Debian archive
  local prefix=${name:0:1}
  [[ $name == lib* ]] && prefix=${name:0:4}
  curl -fsSL --retry 3 -o "$work/$deb" "$MIRROR/pool/main/$prefix/$name/$deb"
}

extract() {  # deb target-dir
  if command -v dpkg-deb >/dev/null; then
    dpkg-deb -x "$1" "$2"
  else
    (cd "$2" && ar p "$1" "$(ar t "$1" | grep '^data\.tar')" | tar -x --auto-compress -f - 2>/dev/null \
      || ar p "$1" data.tar.xz | tar -xJf -)
  fi
}

mkdir -p "$(dirname "$DEST")"
staging=$(mktemp -d "$(dirname "$DEST")/.go.XXXXXX")
trap 'rm -rf "$work" "$staging"' EXIT
for entry in "${PACKAGES[@]}"; do
  read -r name version sha sqlite <<<"$entry"
  echo "fetching $name $version"
  fetch "$name" "$version"
  deb="$work/${name}_${version}_all.deb"
  echo "$sha  $deb" | sha256sum -c --quiet - || { echo "error: $deb: SHA-256 mismatch" >&2; exit 1; }
  mkdir -p "$work/x"
  extract "$deb" "$work/x"
  mv "$work/x/$sqlite" "$staging/"
  rm -rf "$work/x" "$deb"
done
manifest >"$staging/MANIFEST"
chmod 755 "$staging"
rm -rf "$DEST"
mv "$staging" "$DEST"
echo "GO databases in $DEST"

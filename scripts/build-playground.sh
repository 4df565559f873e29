#!/usr/bin/env bash
# Build the playground (web/playground/, served by the API at /playground when
# PLAYGROUND_ENABLED=true) into src/morgana/api/playground_static/, or into the directory given.
#
# npm ci installs exactly the versions of web/playground/package-lock.json (no install scripts:
# esbuild's binary comes from its pinned platform package), tsc type-checks the sources, and
# esbuild bundles them: the same lock and sources give the same files, byte for byte, which
# tests/playground/test_build.py checks against the committed output.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="$ROOT/web/playground"
OUT="${1:-$ROOT/src/morgana/api/playground_static}"

cd "$SRC"
npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
node_modules/.bin/tsc --noEmit -p tsconfig.json
mkdir -p "$OUT"
rm -f "$OUT"/index.html "$OUT"/playground.js "$OUT"/playground.css
node_modules/.bin/esbuild src/main.ts --bundle --minify --format=esm --target=es2020 --legal-comments=eof \
    --log-level=warning --outfile="$OUT/playground.js"
cp index.html "$OUT/index.html"
cp style.css "$OUT/playground.css"
echo "build-playground: built index.html, playground.js and playground.css in $OUT"

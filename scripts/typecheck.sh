#!/usr/bin/env bash
# mypy cannot follow setuptools' editable-install import hook, which serves the repository's
# top-level tasks/ and config/ as numbering.tasks and numbering.config. Lay the package out
# as it is installed, with symlinks in build/typecheck/, and check that.
set -euo pipefail
mypy=$(realpath "${1:-$(command -v mypy)}")
root=$(cd "$(dirname "$0")/.." && pwd)
tree=$root/build/typecheck
rm -rf "$tree"
mkdir -p "$tree/numbering"
for entry in "$root"/numbering/*; do
    ln -s "$entry" "$tree/numbering/"
done
for mapped in tasks config; do
    [ -d "$root/$mapped" ] && ln -s "$root/$mapped" "$tree/numbering/$mapped"
done
cd "$tree"
exec "$mypy" --config-file "$root/pyproject.toml" -p numbering

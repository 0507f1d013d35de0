#!/usr/bin/env bash
# Installs the Debian packages the test suite's peers need (listed in deploy/test-packages.txt).
# Called by `make test`; installs only what is missing, so a second run costs nothing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
list="$here/test-packages.txt"
[ -f "$list" ] || exit 0
missing=()
while read -r pkg _; do
  [ -z "$pkg" ] || [ "${pkg:0:1}" = "#" ] && continue
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done < "$list"
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "install-test-deps: not root; tests needing ${missing[*]} will skip" >&2
  exit 0
fi
echo "install-test-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

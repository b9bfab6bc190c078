#!/usr/bin/env bash
# Installs the Debian packages that building the images and running the tests need
# (images/host-packages.txt), if any is missing. Needs root when something must be installed.
set -euo pipefail
list=$(dirname "${BASH_SOURCE[0]}")/host-packages.txt
missing=()
while read -r pkg; do
    [[ -z $pkg || $pkg == \#* ]] && continue
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done <"$list"
((${#missing[@]})) || exit 0
if [[ $(id -u) -ne 0 ]]; then
    echo "install-host-packages: missing ${missing[*]}; run as root or: apt-get install ${missing[*]}" >&2
    exit 1
fi
echo "install-host-packages: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

#!/usr/bin/env bash
# Install the Debian packages that carry the real corpora, only when a file is missing.
set -euo pipefail
need=()
[ -e /usr/lib/bible.data ] && command -v bible >/dev/null || need+=(bible-kjv-text bible-kjv)
[ -e /usr/share/dictd/gcide.dict.dz ] || need+=(dict-gcide)
[ -e /usr/share/doc/jargon-text/jargon.txt.gz ] || need+=(jargon-text)
ls /usr/share/games/fortunes/fortunes >/dev/null 2>&1 || need+=(fortunes)
[ ${#need[@]} -eq 0 ] && exit 0
echo "installing corpora: ${need[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null

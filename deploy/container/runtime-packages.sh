#!/bin/sh
# runtime-packages.sh BINARY: the Debian packages owning the shared libraries
# BINARY loads, one a line (e.g. libuv1:amd64), for the image's runtime stage.
# Prints nothing for a static binary; fails if a library has no package.
set -eu
libs=$(ldd "$1" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// { print $3 }') || true
pkgs=""
for lib in $libs; do
  owner=""
  # With merged /usr, ldd and dpkg may name the same file differently.
  for p in "$lib" "$(readlink -f "$lib")" "/usr$lib" "${lib#/usr}"; do
    owner=$(dpkg-query -S "$p" 2>/dev/null | head -n 1) && [ -n "$owner" ] && break
  done
  [ -n "$owner" ] || { echo "runtime-packages.sh: no package owns $lib" >&2; exit 1; }
  pkgs="$pkgs ${owner%%: *}"
done
[ -z "$pkgs" ] || printf '%s\n' $pkgs | sort -u

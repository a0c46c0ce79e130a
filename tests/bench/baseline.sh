#!/bin/sh
# Build the starttls-proxy binary of an older git ref, for
# `tests/bench/run.py --baseline PATH` (a regression check: both builds in the
# same rounds).
#
#   tests/bench/baseline.sh [REF [BUILD_DIR [CMAKE_ARGS...]]]
#
# REF        a commit, branch or tag (default: see below). The committed tree
#            of REF is built, never the working tree's uncommitted changes.
# BUILD_DIR  where to build (default /tmp/stp-baseline-build); a directory
#            this script made before is wiped and reused, any other non-empty
#            directory is refused.
# CMAKE_ARGS passed to the configure, after -DSTP_DEPLOY_TESTS=OFF.
#
# Default REF: the merge-base of HEAD with origin/main (or with the local
# branch main when there is no origin/main), i.e. where this branch left
# main; when that is HEAD itself (you are on main, or main has merged this
# branch), HEAD~1.
#
# How: a temporary detached `git worktree` of REF, configured and built
# (only the starttls-proxy target) into BUILD_DIR, then the worktree is
# removed. The build directory is kept: the binary is BUILD_DIR/starttls-proxy,
# printed as the last line on stdout (everything else goes to stderr):
#
#   bin=$(tests/bench/baseline.sh main)
#   tests/bench/run.py --quick --baseline "$bin" --no-stunnel
#
# wolfSSL: deploy/wolfssl.cmake finds the optimized static wolfSSL in the
# cache (~/.cache/starttls-proxy/wolfssl-VERSION-KEY), keyed by wolfSSL's
# version, its flags and deploy/build-wolfssl.sh itself. When REF has the same
# build-wolfssl.sh as the current tree, its configure reuses the current
# tree's wolfSSL (a few seconds); when the script differs, the first configure
# builds a second cached wolfSSL (about 2 minutes on 2 cores, plus the
# download of Debian's source package; later builds of refs with that script
# reuse it). Either way the baseline has the wolfSSL its own tree asks for.
# wolfSSL is linked statically, libuv and inih from the system, so nothing
# in the binary points into the removed worktree.
set -eu

say() { echo "baseline.sh: $*" >&2; }
die() { echo "baseline.sh: error: $*" >&2; exit 1; }

case "${1:-}" in -h|--help) sed -n '2,/^set -eu/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac

repo=$(git -C "$(dirname "$0")" rev-parse --show-toplevel) || die "not in a git checkout"
ref=${1:-}                          # "" too: the default
build=${2:-/tmp/stp-baseline-build}
if [ $# -ge 2 ]; then shift 2; else set --; fi   # the rest: CMAKE_ARGS

what="ref $ref"
if [ -z "$ref" ]; then
  main=origin/main
  git -C "$repo" rev-parse -q --verify "$main^{commit}" >/dev/null || main=main
  ref=$(git -C "$repo" merge-base HEAD "$main") || die "no merge-base of HEAD and $main: give REF"
  what="merge-base of HEAD and $main"
  if [ "$ref" = "$(git -C "$repo" rev-parse HEAD)" ]; then
    ref=HEAD~1
    what="HEAD~1: HEAD is on $main"
  fi
fi
commit=$(git -C "$repo" rev-parse -q --verify "$ref^{commit}") || die "unknown ref '$ref'"
say "building $(git -C "$repo" log -1 --format='%h %s' "$commit") ($what)"

# The build directory: ours from an earlier run (marker file) or new.
case "$build" in /*) ;; *) build=$(pwd)/$build ;; esac
if [ -e "$build" ]; then
  if [ -f "$build/.stp-baseline" ]; then
    rm -rf "$build"
  elif [ -n "$(ls -A "$build" 2>/dev/null)" ]; then
    die "$build exists and is not a build dir of this script (no .stp-baseline): give another BUILD_DIR"
  fi
fi
mkdir -p "$build"
echo "$commit $ref" > "$build/.stp-baseline"

src=$(mktemp -d "${TMPDIR:-/tmp}/stp-baseline-src.XXXXXX")
cleanup() {
  git -C "$repo" worktree remove --force "$src" 2>/dev/null || true
  rm -rf "$src"
  git -C "$repo" worktree prune 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
git -C "$repo" worktree add -q --detach "$src" "$commit" >&2

t0=$(date +%s)
# Unknown -D options (an older tree without STP_DEPLOY_TESTS) only warn.
cmake -S "$src" -B "$build" -DSTP_DEPLOY_TESTS=OFF "$@" >&2
t1=$(date +%s)
cmake --build "$build" -j"$(nproc 2>/dev/null || echo 2)" --target starttls-proxy >&2
t2=$(date +%s)
[ -x "$build/starttls-proxy" ] || die "no $build/starttls-proxy after the build"
say "configure $((t1 - t0)) s, build $((t2 - t1)) s; $("$build/starttls-proxy" -V 2>/dev/null || echo '?')"
echo "$build/starttls-proxy"

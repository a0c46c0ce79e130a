#!/bin/sh
# Build wolfSSL once, optimized and with only what starttls-proxy uses, as a
# static library in a prefix keyed by its version, its configure flags and
# this script, so every later build of the project reuses it.
#
#   deploy/build-wolfssl.sh [PREFIX]        build unless already built; print the prefix
#   deploy/build-wolfssl.sh --print-prefix  print the prefix it would use; build nothing
#
# Without PREFIX the prefix is
#   ${XDG_CACHE_HOME:-$HOME/.cache}/starttls-proxy/wolfssl-VERSION-KEY
# and after a build, prefixes there that no build used for 30 days (older
# versions, other flags) are removed.
#
# Where the source comes from:
#   STP_WOLFSSL_SRC=DIR|TARBALL  a wolfSSL source tree or release tarball
#   (unset)                      Debian's source package (`apt-get source
#                                wolfssl`, with its security patches), through
#                                deb-src lists of our own made from the
#                                machine's deb entries; the system's apt
#                                configuration and lists are not touched.
# Other settings:
#   STP_CACHE_DIR          cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/starttls-proxy)
#   STP_WOLFSSL_JOBS       parallel compile jobs (default: nproc)
#   STP_WOLFSSL_REFRESH=1  re-read Debian's source index now (it is re-read on
#                          its own when older than a week, or when the system's
#                          libwolfssl-dev candidate is newer)
#   STP_WOLFSSL_CC, STP_WOLFSSL_CFLAGS
#                          compiler (default cc) and extra CFLAGS for wolfSSL;
#                          part of the key. CC, CFLAGS, CPPFLAGS and LDFLAGS
#                          are ignored, so `CC=clang cmake ...` (the fuzz
#                          build) reuses the same wolfSSL.
#
# Progress goes to stderr; stdout carries only the prefix.
set -eu

script=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
print_only=0
case "${1:-}" in
  --print-prefix) print_only=1; shift ;;
  -h|--help) sed -n '2,/^set -eu/p' "$script" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  -*) echo "usage: $0 [--print-prefix] [PREFIX]" >&2; exit 2 ;;
esac
[ $# -le 1 ] || { echo "usage: $0 [--print-prefix] [PREFIX]" >&2; exit 2; }
want_prefix=${1:-}

say() { echo "build-wolfssl: $*" >&2; }
die() { echo "build-wolfssl: error: $*" >&2; exit 1; }

cache=${STP_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/starttls-proxy}
cc=${STP_WOLFSSL_CC:-cc}
cflags=${STP_WOLFSSL_CFLAGS:-}
unset CC CFLAGS CPPFLAGS LDFLAGS
jobs=${STP_WOLFSSL_JOBS:-$(nproc 2>/dev/null || echo 2)}
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

# What starttls-proxy uses, and nothing else (each line says why):
flags="--enable-static --disable-shared --with-pic"      # linked into the daemon
flags="$flags --disable-examples --disable-crypttests --disable-jobserver"
flags="$flags --enable-tls13 --enable-tlsv12"             # Mozilla intermediate
flags="$flags --enable-oldtls --enable-tlsv10"            # bridging legacy devices; off at run time by min_version
flags="$flags --enable-ecc --enable-rsa --enable-curve25519" # ECDHE P-256/P-384/X25519; ECDSA and RSA certificates
flags="$flags --enable-curve448"                          # X448: the `groups` setting offers it (14 KB of code)
flags="$flags --enable-aesgcm --enable-chacha --enable-poly1305"
flags="$flags --enable-sni --enable-session-ticket --enable-supportedcurves"
flags="$flags --enable-certgen --enable-keygen"           # in-memory self-signed certificate (wc_MakeCert, wc_EccKeyToDer)
# The OpenSSL compatibility layer: set_SSL_CTX, set_min/max_proto_version,
# get_peer_certificate, X509_get_subject_name need OPENSSL_EXTRA, and
# CTX_set_servername_callback needs OPENSSL_ALL in 5.5.4 (ssl.c compiles it only
# for OPENSSL_ALL or the stunnel/nginx/haproxy/lighty builds). Debian's package
# has both, so the proxy keeps the behaviour it was tested with. Cost over no
# compatibility layer: about 5 KB of heap per session and 420 KB of code.
flags="$flags --enable-opensslextra --enable-opensslall"
flags="$flags --disable-dh --disable-sha3"                # no DHE suites or FFDHE groups; TLS does not use SHA-3
# Single-precision math for the key sizes TLS meets: RSA 2048-4096, P-256,
# P-384 (P-521 falls back to generic math and saves 700 KB of tables).
sp="--enable-sp=rsa2048,rsa3072,rsa4096,ec256,ec384"
# WOLFSSL_ALT_NAMES has no configure switch: subjectAltName in generated certs
# and in peer name checks. CPPFLAGS defines land in wolfssl/options.h, so the
# proxy sees the same structures as the library.
defs="-DWOLFSSL_ALT_NAMES"
# TLS 1.3: the session ticket leaves with the server's Finished, not after the
# client's (RFC 8446 4.6.1 allows it without client authentication; wolfSSL
# waits when it asks for a client certificate): one write and one wake-up of
# the client less per handshake.
defs="$defs -DWOLFSSL_TLS13_TICKET_BEFORE_FINISHED"

target=$($cc -dumpmachine 2>/dev/null) || die "no C compiler ($cc); install build-essential"
case "$target" in
  x86_64-*|amd64-*)
    # AES-NI/PCLMUL, AVX1/AVX2 for AES-GCM, ChaCha20-Poly1305 and SHA-2 (chosen
    # at run time from CPUID), and assembly P-256/P-384/RSA/X25519 math.
    flags="$flags --enable-aesni --enable-intelasm $sp --enable-sp-asm"
    ;;
  *)
    say "no assembly options for $target: portable C (single-precision math in C; AES-GCM and ECDSA slower than on x86_64)"
    flags="$flags $sp --disable-sp-asm"
    ;;
esac
# Seeds (one per TLS session) from getrandom(2): one system call instead of
# opening, reading and closing /dev/urandom, and no /dev needed in a chroot.
case "$target" in *-linux-*) defs="$defs -DWOLFSSL_GETRANDOM" ;; esac

# -- where the source comes from, and its version --------------------------

apt_state=$cache/apt
apt_opts() {
  echo "-o Dir::Etc::SourceList=$apt_state/none.list -o Dir::Etc::SourceParts=$apt_state/parts" \
       "-o Dir::State::Lists=$apt_state/lists -o Dir::Cache=$apt_state/cache"
  # Root hands downloads to the _apt user, who cannot write into our cache.
  [ "$(id -u)" -ne 0 ] || echo "-o APT::Sandbox::User=root"
}

# deb-src entries of our own for each deb entry of this release (both the
# one-line .list and the deb822 .sources formats), so `apt-get source` works on
# a machine whose apt configuration has no deb-src line.
apt_write_sources() {
  codename=$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")
  rm -rf "$apt_state/parts"; mkdir -p "$apt_state/parts"
  : > "$apt_state/none.list"
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    awk -v cn="$codename" '
      $1 == "deb" || $1 == "deb-src" {
        i = 2; opts = ""
        if ($2 ~ /^\[/) { while (i <= NF) { opts = opts " " $i; if ($i ~ /\]$/) break; i++ } i++ }
        uri = $i; suite = $(i + 1)
        if (cn != "" && index(suite, cn) != 1) next
        line = "deb-src" opts " " uri
        for (j = i + 1; j <= NF && $j !~ /^#/; j++) line = line " " $j
        print line
      }' "$f" >> "$apt_state/parts/stp.list"
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk -v cn="$codename" '
      function flush(   k, s, n, i, keep) {
        if (nf == 0) return
        if (tolower(val["enabled"]) != "no" && val["types"] ~ /(^|[ \t])deb(-src)?([ \t]|$)/) {
          n = split(val["suites"], s, /[ \t]+/); keep = ""
          for (i = 1; i <= n; i++)
            if (s[i] != "" && (cn == "" || index(s[i], cn) == 1)) keep = keep " " s[i]
          if (keep != "") {
            print "Types: deb-src"
            for (k = 1; k <= nf; k++) {
              if (key[k] == "types" || key[k] == "enabled") continue
              if (key[k] == "suites") print "Suites:" keep
              else printf "%s", raw[key[k]]
            }
            print ""
          }
        }
        nf = 0; delete val; delete raw
      }
      /^#/ { next }
      /^[ \t]*$/ { flush(); next }
      /^[ \t]/ { if (cur != "") { raw[cur] = raw[cur] $0 "\n"; val[cur] = val[cur] " " $0 } next }
      {
        p = index($0, ":"); cur = tolower(substr($0, 1, p - 1))
        key[++nf] = cur; raw[cur] = $0 "\n"; val[cur] = substr($0, p + 1)
      }
      END { flush() }' "$f" >> "$apt_state/parts/stp.sources"
  done
  # A deb and a deb-src line for the same archive give the same entry twice.
  if [ -s "$apt_state/parts/stp.list" ]; then
    awk '!seen[$0]++' "$apt_state/parts/stp.list" > "$apt_state/parts/stp.tmp"
    mv "$apt_state/parts/stp.tmp" "$apt_state/parts/stp.list"
  else
    rm -f "$apt_state/parts/stp.list"
  fi
  [ -s "$apt_state/parts/stp.sources" ] || rm -f "$apt_state/parts/stp.sources"
  ls "$apt_state/parts"/* >/dev/null 2>&1 ||
    die "no deb entry for '${codename:-this release}' in /etc/apt; set STP_WOLFSSL_SRC to a wolfSSL source tree or release tarball"
}

apt_update() {
  mkdir -p "$apt_state/lists/partial" "$apt_state/cache/archives/partial"
  apt_write_sources
  say "reading Debian's source index (private apt lists in $apt_state)"
  # shellcheck disable=SC2046
  apt-get $(apt_opts) -o Acquire::Retries=1 -o Acquire::http::Timeout=30 -q update >"$apt_state/update.log" 2>&1
}

# The version apt would fetch, from our lists alone (no network).
apt_version() {
  # shellcheck disable=SC2046
  apt-get $(apt_opts) source --print-uris wolfssl 2>/dev/null |
    sed -n "s/^'[^']*' wolfssl_\(.*\)\.dsc .*/\1/p" | head -n 1
}

# The version comes from our own lists, re-read when missing, older than a
# week, asked for, or older than a libwolfssl-dev the system's lists know of.
# Remembered in $apt_state/version, so a configure with a warm cache costs a
# few file stats.
debian_source() {
  command -v apt-get >/dev/null ||
    die "no apt-get here: set STP_WOLFSSL_SRC to a wolfSSL source tree or release tarball"
  vfile=$apt_state/version
  have_lists=0
  ls "$apt_state/lists/"*Sources* >/dev/null 2>&1 && have_lists=1
  [ $have_lists = 1 ] || rm -f "$vfile"
  refresh=0
  if [ $have_lists = 0 ] || [ "${STP_WOLFSSL_REFRESH:-0}" = 1 ]; then
    refresh=1
  elif [ -n "$(find "$apt_state/lists" -maxdepth 0 -mtime +7 2>/dev/null)" ]; then
    refresh=1
  elif [ -s "$vfile" ] &&
       [ -n "$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -newer "$vfile" 2>/dev/null | head -n 1)" ]; then
    # The system's lists changed since: is there a newer wolfSSL?
    sysver=$(apt-cache policy libwolfssl-dev 2>/dev/null | sed -n 's/^ *Candidate: //p')
    case "$sysver" in ""|"(none)") ;; *)
      dpkg --compare-versions "$sysver" le "$(cat "$vfile")" || refresh=1 ;;
    esac
    touch "$vfile"
  fi
  if [ $refresh = 1 ]; then
    if apt_update; then
      rm -f "$vfile"
    elif [ $have_lists = 1 ]; then
      say "could not refresh Debian's source index (offline?): using the one from before"
    else
      cat "$apt_state/update.log" >&2
      die "apt-get update for deb-src failed; set STP_WOLFSSL_SRC to a wolfSSL source tree or release tarball"
    fi
    touch "$apt_state/lists"  # the next try in a week, even after a failed one
  fi
  [ -s "$vfile" ] || apt_version > "$vfile"
  version=$(cat "$vfile")
  [ -n "$version" ] ||
    die "Debian has no source package 'wolfssl' in the deb-src entries $apt_state/parts/* (see $apt_state/update.log); set STP_WOLFSSL_SRC"
  source_id="debian:wolfssl_$version"
}

given_source() {
  src=$STP_WOLFSSL_SRC
  if [ -d "$src" ]; then
    src=$(cd "$src" && pwd)
    [ -f "$src/configure.ac" ] && [ -f "$src/wolfssl/version.h" ] ||
      die "$src is not a wolfSSL source tree (no configure.ac, wolfssl/version.h)"
    version=$(sed -n 's/^#define LIBWOLFSSL_VERSION_STRING "\(.*\)"/\1/p' "$src/wolfssl/version.h")
    # A tree can change under the same version: key on its path and, for a git
    # checkout, its commit.
    rev=$(git -C "$src" rev-parse HEAD 2>/dev/null || true)
    source_id="dir:$src:$rev"
  elif [ -f "$src" ]; then
    src=$(cd "$(dirname "$src")" && pwd)/$(basename "$src")
    case "$src" in
      *.zip) vh=$(unzip -p "$src" '*/wolfssl/version.h' 2>/dev/null || true) ;;
      *) vh=$(tar -xOf "$src" --wildcards '*/wolfssl/version.h' 2>/dev/null || true) ;;
    esac
    version=$(echo "$vh" | sed -n 's/^#define LIBWOLFSSL_VERSION_STRING "\(.*\)"/\1/p' | head -n 1)
    source_id="tarball:$(sha256sum "$src" | cut -c1-64)"
  else
    die "STP_WOLFSSL_SRC=$src: no such directory or file"
  fi
  version=${version:-unknown}
}

if [ -n "${STP_WOLFSSL_SRC:-}" ]; then given_source; else debian_source; fi

# -- the key and the prefix --------------------------------------------------

ccver=$($cc --version 2>/dev/null | head -n 1)
key=$(printf '%s\n' "$source_id" "$flags" "$defs" "$cflags" "$target" "$ccver" \
        "$(sha256sum "$script" | cut -c1-64)" | sha256sum | cut -c1-12)
verpath=$(echo "$version" | tr ':/' '__')
prefix=${want_prefix:-$cache/wolfssl-$verpath-$key}
case "$prefix" in /*) ;; *) prefix=$(pwd)/$prefix ;; esac
stamp=$prefix/.stp-wolfssl

if [ $print_only = 1 ]; then
  echo "$prefix"
  exit 0
fi

built() { [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ] && [ -f "$prefix/lib/libwolfssl.a" ]; }
# The stamp's time says when a prefix was last used (see prune below).
reuse() {
  touch "$stamp" 2>/dev/null || :
  say "wolfSSL $version already built in $prefix"
  echo "$prefix"
  exit 0
}
built && reuse

# One build at a time per prefix (two configures at once wait for each other).
mkdir -p "$cache" "$(dirname "$prefix")"
if command -v flock >/dev/null && [ -z "${STP_WOLFSSL_LOCKED:-}" ]; then
  STP_WOLFSSL_LOCKED=1 exec flock "$prefix.lock" sh "$script" "$@"
fi
built && reuse

# -- tools ---------------------------------------------------------------------

need=""
command -v make >/dev/null || need="$need make"
command -v autoreconf >/dev/null || need="$need autoconf"
command -v aclocal >/dev/null || need="$need automake"
command -v libtoolize >/dev/null || need="$need libtool"
[ -n "${STP_WOLFSSL_SRC:-}" ] || command -v dpkg-source >/dev/null || need="$need dpkg-dev"
case "${STP_WOLFSSL_SRC:-}" in *.zip) command -v unzip >/dev/null || need="$need unzip" ;; esac
if [ -n "$need" ]; then
  command -v apt-get >/dev/null || die "install:$need"
  say "installing:$need"
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need >/dev/null
fi

# -- fetch, configure, build, install -----------------------------------------

start=$(date +%s)
work=$(mktemp -d "${TMPDIR:-/tmp}/stp-wolfssl.XXXXXX")
trap 'rm -rf "$work"' EXIT
log=$prefix.log
: > "$log"

if [ -n "${STP_WOLFSSL_SRC:-}" ]; then
  say "wolfSSL $version from $src"
  case "$src" in
    *.zip) unzip -q "$src" -d "$work/x" ;;
    *.tar*|*.tgz) mkdir "$work/x" && tar -xf "$src" -C "$work/x" ;;
    *) mkdir "$work/x" && cp -R "$src/." "$work/x/wolfssl" ;;
  esac
  tree=$(dirname "$(find "$work/x" -maxdepth 3 -name configure.ac | head -n 1)")
else
  say "wolfSSL $version: Debian's source package"
  mkdir "$work/x"
  # shellcheck disable=SC2046
  (cd "$work/x" && apt-get $(apt_opts) -q source "wolfssl" >>"$log" 2>&1) || {
    tail -n 20 "$log" >&2; die "apt-get source wolfssl failed (log: $log)"; }
  tree=$(find "$work/x" -mindepth 1 -maxdepth 1 -type d -name 'wolfssl-*' | head -n 1)
  ls "$work/x/wolfssl_$version.dsc" >/dev/null 2>&1 ||
    die "apt-get source fetched something other than wolfssl $version (see $log)"
fi
[ -n "$tree" ] && [ -f "$tree/configure.ac" ] || die "no wolfSSL source tree found in $work/x"

run() {  # run a step with its output in the log; show the log's end on failure
  step=$1; shift
  say "$step"
  if ! "$@" >>"$log" 2>&1; then
    tail -n 40 "$log" >&2
    die "$step failed (whole log: $log)"
  fi
}
cd "$tree"
# A given tree may hold objects built with other flags.
[ ! -f Makefile ] || run "make distclean (the given tree was built before)" make distclean
[ -x configure ] || run "autogen (autoreconf)" ./autogen.sh
# shellcheck disable=SC2086
run "configure:$flags CPPFLAGS=\"$defs\"${cflags:+ CFLAGS=\"$cflags\"}" \
  ./configure --prefix="$prefix" $flags CC="$cc" CPPFLAGS="$defs" ${cflags:+CFLAGS="$cflags"}
say "compiling with $jobs jobs (once; about a minute on 2 cores)"
# Progress: one short line per compiled file.
{ make -j"$jobs" V=0 2>&1; echo $? > "$work/make.rc"; } | tee -a "$log" |
  sed -n 's/^ *\(CCLD\|CPPAS\|CCAS\|CC\|AR\) *\(.*\)/  \1 \2/p' >&2
[ "$(cat "$work/make.rc")" = 0 ] || { tail -n 40 "$log" >&2; die "make failed (whole log: $log)"; }

# Install into a staging dir, then move it into place, so an interrupted build
# never leaves a prefix that looks complete.
run "install" make install DESTDIR="$work/stage"
rm -rf "$prefix"
mkdir -p "$(dirname "$prefix")"
mv "$work/stage$prefix" "$prefix"
rm -rf "$prefix/share/doc"
echo "$key" > "$stamp"
say "wolfSSL $version built in $(($(date +%s) - start))s: $prefix"

# Prune: prefixes in the cache (other versions or flags) unused for 30 days.
if [ -z "$want_prefix" ]; then
  for old in "$cache"/wolfssl-*/.stp-wolfssl; do
    [ -f "$old" ] || continue
    dir=${old%/.stp-wolfssl}
    [ "$dir" != "$prefix" ] && [ -n "$(find "$old" -mtime +30 2>/dev/null)" ] || continue
    say "removing $dir (unused for 30 days)"
    rm -rf "$dir" "$dir.log" "$dir.lock"
  done
  # Locks and logs of builds that never finished.
  for f in "$cache"/wolfssl-*.lock "$cache"/wolfssl-*.log; do
    [ -f "$f" ] && [ ! -d "${f%.*}" ] && [ -n "$(find "$f" -mtime +30 2>/dev/null)" ] &&
      rm -f "$f"
  done
fi
echo "$prefix"

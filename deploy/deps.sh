#!/bin/sh
# Install what starttls-proxy needs from Debian's archive (Debian 12).
#   deploy/deps.sh          build dependencies
#   deploy/deps.sh --demo   + smtp-sink (postfix) and swaks for the demo
#   deploy/deps.sh --test   + everything the test suite runs against
# Only missing packages are installed; nothing happens when all are present.
set -eu
build="cmake build-essential pkg-config libuv1-dev libwolfssl-dev libinih-dev"
demo="postfix swaks libnet-ssleay-perl libio-socket-ssl-perl"
# The suite's peers and tools: real mail software (Postfix's smtp-sink, smtpd
# and posttls-finger, Dovecot's LMTP server, aiosmtpd, swaks, curl, openssl,
# haproxy as a load balancer sending PROXY headers),
# TLS auditors (testssl.sh, sslscan), the fuzzers' clang, and for deploy/:
# podman with what it needs without recommends, debootstrap for a local base
# image, and systemd for the unit's analysis; nftables, iproute2 and
# util-linux's setpriv for the transparent (TPROXY/REDIRECT) tests;
# prometheus for promtool, which lints a real /metrics scrape.
test="$demo curl openssl python3 python3-pytest python3-aiosmtpd python3-yaml \
  python3-cryptography procps bsdextrautils clang libclang-rt-14-dev \
  testssl.sh sslscan stunnel4 haproxy dovecot-core dovecot-lmtpd dovecot-pop3d dovecot-imapd \
  podman runc netavark aardvark-dns iptables catatonit debootstrap systemd \
  nftables iproute2 util-linux prometheus"
want=$build
case "${1:-}" in
  --demo) want="$build $demo" ;;
  --test) want="$build $test" ;;
  "") ;;
  *) echo "usage: $0 [--demo|--test]" >&2; exit 2 ;;
esac
missing=""
for p in $want; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing:$missing" >&2
# Postfix asks how to configure itself; the demo and tests only use smtp-sink.
echo 'postfix postfix/main_mailer_type select No configuration' | $sudo debconf-set-selections
$sudo apt-get update -qq
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null

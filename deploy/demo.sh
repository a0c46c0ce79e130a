#!/bin/sh
# Demo: install what is missing, build, and start starttls-proxy on
# 127.0.0.1:10025 in front of a plaintext smtp-sink on 127.0.0.1:10026.
#   deploy/demo.sh        start (both run in the background)
#   deploy/demo.sh stop   stop them
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
run="$top/build/demo"
stop() {
  for p in proxy sink; do
    [ -f "$run/$p.pid" ] && kill "$(cat "$run/$p.pid")" 2>/dev/null || true
    rm -f "$run/$p.pid"
  done
}
if [ "${1:-}" = stop ]; then stop; echo "demo stopped"; exit 0; fi

"$top/deploy/deps.sh" --demo
cmake -S "$top" -B "$top/build" >/dev/null
cmake --build "$top/build" -j"$(nproc)" >/dev/null
mkdir -p "$run"
stop

# smtp-sink drops root privileges only when asked to.
user=""
[ "$(id -u)" -eq 0 ] && user="-u nobody"
/usr/sbin/smtp-sink $user -c 127.0.0.1:10026 100 >"$run/sink.log" 2>&1 &
echo $! >"$run/sink.pid"
"$top/build/starttls-proxy" -c "$top/conf/demo.ini" >"$run/proxy.log" 2>&1 &
echo $! >"$run/proxy.pid"

# Ready when the listener is bound (the proxy logs event=listening).
i=0
until grep -q "event=listening" "$run/proxy.log" 2>/dev/null; do
  i=$((i + 1))
  if [ $i -gt 50 ] || ! kill -0 "$(cat "$run/proxy.pid")" 2>/dev/null; then
    cat "$run/proxy.log" >&2; echo "starttls-proxy did not start" >&2; exit 1
  fi
  sleep 0.1
done
cat <<MSG
starttls-proxy is listening on 127.0.0.1:10025 (STARTTLS required) in front of
smtp-sink on 127.0.0.1:10026. Try it:

  swaks --tls --server 127.0.0.1:10025 --to a@example.net --from b@example.org

Proxy log: $run/proxy.log   Stop: deploy/demo.sh stop
MSG

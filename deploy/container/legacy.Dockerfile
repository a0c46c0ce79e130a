# A stand-in for the legacy plaintext mail server in the sidecar examples
# (deploy/k8s, deploy/compose.yaml) and their tests: Postfix's smtp-sink on
# Debian, which accepts every message and writes each one to a file under
# /var/spool/smtp-sink. Replace it with your own mail server's image.
#   podman build -f deploy/container/legacy.Dockerfile -t starttls-proxy-legacy deploy/container
ARG BASE=debian:bookworm-slim
FROM ${BASE}
RUN echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections \
 && apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postfix tini >/dev/null \
 && apt-get clean && rm -rf /var/lib/apt/lists/* \
 && install -d -o nobody -g nogroup /var/spool/smtp-sink
USER nobody
# smtp-sink has no SIGTERM handler: as PID 1 it would ignore "stop" until
# killed; tini is PID 1 and passes the signal on.
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/sbin/smtp-sink"]
# Loopback only: reachable from the proxy in the same pod, from nowhere else.
CMD ["-d", "/var/spool/smtp-sink/%Y%m%d%H%M%S.", "-h", "legacy.example.net", "127.0.0.1:2525", "100"]

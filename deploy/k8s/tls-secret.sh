#!/bin/sh
# tls-secret.sh CERT KEY [NAME]: print a Kubernetes TLS Secret (default name
# starttls-proxy-tls) holding the PEM certificate chain CERT and key KEY, the
# same YAML as `kubectl create secret tls NAME --cert=CERT --key=KEY
# --dry-run=client -o yaml`, for machines without kubectl:
#   deploy/k8s/tls-secret.sh fullchain.pem privkey.pem | podman kube play -
# (podman 4.4 or later: 4.3 mounts Secret values still base64-encoded,
# podman issue 16625.)
set -eu
[ $# -ge 2 ] && [ $# -le 3 ] || { echo "usage: $0 CERT KEY [NAME]" >&2; exit 2; }
grep -q -- '-----BEGIN CERTIFICATE-----' "$1" || { echo "$0: $1: no PEM certificate" >&2; exit 1; }
grep -q -- '-----BEGIN .*PRIVATE KEY-----' "$2" || { echo "$0: $2: no PEM private key" >&2; exit 1; }
cat <<YAML
apiVersion: v1
kind: Secret
metadata:
  name: ${3:-starttls-proxy-tls}
type: kubernetes.io/tls
data:
  tls.crt: $(base64 -w 0 "$1")
  tls.key: $(base64 -w 0 "$2")
YAML

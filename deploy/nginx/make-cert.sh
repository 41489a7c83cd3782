#!/bin/sh
# Make a self-signed TLS certificate for the compose stack's reverse proxy.
#
#   deploy/nginx/make-cert.sh [HOSTNAME] [OUTDIR]
#
# HOSTNAME defaults to localhost, OUTDIR to deploy/nginx/certs (what
# compose.yaml mounts at /etc/nginx/certs). Writes fullchain.pem and
# privkey.pem (mode 0600). Agents must be given fullchain.pem as their trusted
# CA, or use a certificate from a real CA instead: put its chain and key in
# OUTDIR under the same names.
set -eu

host="${1:-localhost}"
outdir="${2:-$(dirname "$0")/certs}"
days="${CERT_DAYS:-365}"

san="DNS:$host,DNS:localhost,IP:127.0.0.1"
[ "$host" = localhost ] && san="DNS:localhost,IP:127.0.0.1"

mkdir -p "$outdir"
umask 077
openssl req -x509 -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
    -sha256 -days "$days" \
    -subj "/CN=$host" \
    -addext "subjectAltName=$san" \
    -addext "basicConstraints=critical,CA:FALSE" \
    -addext "keyUsage=critical,digitalSignature" \
    -addext "extendedKeyUsage=serverAuth" \
    -keyout "$outdir/privkey.pem" -out "$outdir/fullchain.pem" 2>/dev/null
chmod 0644 "$outdir/fullchain.pem"
chmod 0600 "$outdir/privkey.pem"
echo "wrote $outdir/fullchain.pem and $outdir/privkey.pem (CN=$host, valid $days days)" >&2

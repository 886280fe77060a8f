#!/usr/bin/env bash
# Generate a private CA, a PS certificate, client certificates and a shared token (PEM, openssl).
#
#   scripts/gen_certs.sh OUT_DIR [SERVER_NAME [WORKER_ID ...]]
#
# SERVER_NAME (default "ps") goes in the PS certificate's subjectAltName with localhost and
# 127.0.0.1; each worker certificate's common name is its worker id, which the PS binds to the
# id the worker may use (server/auth.py). A worker id of "worker" makes one certificate that all
# workers share (compose's replicas: no id is bound, server/auth.py SHARED_CERT_NAMES).
# Default workers: worker-0 worker-1. The PS certificate may also authenticate as a client, so
# tools inside the PS container (its healthcheck, `gradwire status`, `gradwire bytes`) reach the
# PS with its own credentials. OUT_DIR/token is a random shared token (64 hex digits), written
# only when it is missing. Keys are EC P-256, readable by their owner only; certificates valid
# 30 days: for tests and compose, not a production PKI.
set -euo pipefail
out=${1:?usage: gen_certs.sh OUT_DIR [SERVER_NAME [WORKER_ID ...]]}
server_name=${2:-ps}
shift $(( $# >= 2 ? 2 : $# ))
workers=("$@")
[ ${#workers[@]} -gt 0 ] || workers=(worker-0 worker-1)
mkdir -p "$out"
cd "$out"
umask 077

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

key ca.key
openssl req -x509 -new -key ca.key -sha256 -days 30 -subj "/CN=gradwire test CA" -out ca.pem \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"

sign() {  # name, common name, extensions file
    key "$1.key"
    openssl req -new -key "$1.key" -subj "/CN=$2" -out "$1.csr"
    openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -sha256 -days 30 \
        -extfile "$3" -out "$1.pem" 2>/dev/null
    rm -f "$1.csr" "$3"
}

printf 'subjectAltName=DNS:%s,DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n' \
    "$server_name" > server.ext
sign server "$server_name" server.ext
for w in "${workers[@]}"; do
    printf 'extendedKeyUsage=clientAuth\n' > "$w.ext"
    sign "$w" "$w" "$w.ext"
done
[ -s token ] || openssl rand -hex 32 > token
rm -f ca.srl
chmod 644 ./*.pem
echo "wrote CA, server and ${#workers[@]} worker certificates and a token to $out"

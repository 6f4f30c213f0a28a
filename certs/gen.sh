#!/usr/bin/env bash
# Development certificates for Tern's TLS listener: a CA, a server certificate for
# localhost / 127.0.0.1 / ::1, and a client certificate (CN=device1) for mutual TLS.
# Usage: certs/gen.sh [OUT_DIR] [CLIENT_CN]    (default: certs/, device1)
# Never use these outside development: the CA key sits next to them.
set -euo pipefail
out=${1:-certs}
cn=${2:-device1}
mkdir -p "$out"
cd "$out"
days=825
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$days" \
  -subj "/CN=Tern Development CA" -keyout ca.key -out ca.pem 2>/dev/null
cat > server.ext <<EXT
basicConstraints = CA:FALSE
keyUsage = digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1, IP:::1
EXT
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
  -keyout server.key -out server.csr 2>/dev/null
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days "$days" \
  -extfile server.ext -out server.pem 2>/dev/null
cat > client.ext <<EXT
basicConstraints = CA:FALSE
keyUsage = digitalSignature
extendedKeyUsage = clientAuth
EXT
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$cn" \
  -keyout client.key -out client.csr 2>/dev/null
openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days "$days" \
  -extfile client.ext -out client.pem 2>/dev/null
rm -f server.csr client.csr server.ext client.ext ca.srl
chmod 600 ./*.key
echo "certs: wrote $(pwd)/{ca,server,client}.{pem,key}"

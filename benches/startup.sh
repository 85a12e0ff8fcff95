#!/usr/bin/env bash
# Cold start to ready and idle memory of the release binary.
# Usage: benches/startup.sh   (builds the release binary if needed)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
start=$(date +%s%N)
FHIRGATE_STORE__DATA_DIR="$dir" FHIRGATE_SERVER__BIND="127.0.0.1:$port" FHIRGATE_LOG__LEVEL=warn \
  ./target/release/fhirgate serve &
pid=$!
trap 'kill $pid 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 1 2000); do
  if curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1; then break; fi
  sleep 0.001
done
ready=$(date +%s%N)
echo "cold start to ready: $(( (ready - start) / 1000000 )) ms"
# One write and read so the schema and store are warm, then let it idle. A fresh server writes
# its first admin key into the data folder.
auth="Authorization: Bearer $(cat "$dir/admin-api-key")"
curl -fs -X PUT "http://127.0.0.1:$port/fhir/Patient/idle" -H 'content-type: application/fhir+json' \
  -H "$auth" -d '{"resourceType":"Patient","id":"idle"}' >/dev/null
curl -fs -H "$auth" "http://127.0.0.1:$port/fhir/Patient/idle" >/dev/null
sleep 1
echo "idle RSS: $(awk '/VmRSS/ {print $2, $3}' /proc/$pid/status) (anonymous $(awk '/RssAnon/ {print $2, $3}' /proc/$pid/status), file-backed $(awk '/RssFile/ {print $2, $3}' /proc/$pid/status))"

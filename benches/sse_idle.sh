#!/usr/bin/env bash
# Memory of idle Server-Sent Events connections: the release binary with one pipeline tenant,
# N (default 10000) `GET /events` connections opened and held, RSS before and after.
# Usage: benches/sse_idle.sh [connections [path [seconds]]]   (builds the release binary if needed)
# A path other than /events (e.g. /healthz) measures idle keep-alive connections for comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
connections=${1:-10000}
# Each side holds one descriptor per connection.
ulimit -n "$(ulimit -Hn)"
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((connections + 512)) ]; then
  echo "open-file limit $(ulimit -n) is too low for $connections connections" >&2
  exit 1
fi
cargo build --release --quiet
dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# The tenant's EHR is not running: its poller backs off, which is all this needs.
cat > "$dir/fhirgate.toml" <<TOML
[server]
bind = "127.0.0.1:$port"
max_connections = $((connections + 100))
rate_limit_per_sec = 0
[store]
data_dir = "$dir/data"
[log]
level = "warn"
[sources.clinic]
kind = "fhir"
base_url = "http://127.0.0.1:9/fhir"
[pipeline.tenants.clinic]
write_back = "local"
TOML
./target/release/fhirgate serve --config "$dir/fhirgate.toml" 2>/dev/null &
pid=$!
trap 'kill $pid 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 1 2000); do
  if curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1; then break; fi
  sleep 0.005
done
key=$(cat "$dir/data/admin-api-key")
# Warm up: one stream opened and closed.
curl -fs -m 1 -H "authorization: Bearer $key" "http://127.0.0.1:$port/events?tenant=clinic" >/dev/null || true
sleep 1
python3 benches/sse_idle.py "$port" "$key" "$connections" "$pid" "${2:-/events?tenant=clinic}" "${3:-17}"

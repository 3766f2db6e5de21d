#!/usr/bin/env bash
# The quick start: create the schema and a sequence in ./demo.db (SQLite, no server),
# number 2,000 invoices from 8 threads at once, resend one request, and audit the ledger.
# With NUMBERING_DATABASE_URL set (e.g. to PostgreSQL) the same steps run there.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
export NUMBERING_DATABASE_URL=${NUMBERING_DATABASE_URL:-sqlite:///$PWD/demo.db}
run=$(date +%s)

$bin/numbering init-db
$bin/numbering sequence create invoices --exist-ok
$bin/python - "$run" <<'PY'
import sys, threading, time
from numbering import Allocator

run = sys.argv[1]
numbers = Allocator.from_env()
done = []
def clerk(c):
    for i in range(250):
        done.append(numbers.next_value("invoices", key=f"demo-{run}-clerk{c}-invoice{i}"))
threads = [threading.Thread(target=clerk, args=(c,)) for c in range(8)]
started = time.monotonic()
for t in threads:
    t.start()
while any(t.is_alive() for t in threads):
    time.sleep(0.5)
    print(f"  {len(done):5d} / 2000 invoices numbered", flush=True)
print(f"8 clerks numbered 2000 invoices in {time.monotonic() - started:.1f}s: "
      f"{min(done)}..{max(done)}, {numbers.stats.total} retried transaction(s)")
PY
echo "asking again for demo-$run-clerk0-invoice0 gives the same number:" \
    "$($bin/numbering next --direct invoices --key "demo-$run-clerk0-invoice0")"
$bin/numbering sequence show invoices
$bin/numbering audit invoices

#!/usr/bin/env bash
# Compare our MUPDATE master with the real Cyrus 3.6.1 master on this machine, in one run.
#
#   tools/bench/compare.sh [OUTPUT_FILE]      (default: ./mupdate-compare.txt)
#
# Builds release binaries, starts OUR `mupdated` (fresh temp data dir) and a Cyrus 3.6.1
# `mupdate -m` under cyrmaster (fresh temp dir, sasldb user, default durable twoskip,
# allowplaintext), both on 127.0.0.1, and runs the same mupdate-bench workloads against each,
# ours first, then Cyrus, step by step:
#   1. write: 20,000 new mailboxes (RESERVE then ACTIVATE), 32 connections, pipeline 1
#   2. update-sync: UPDATE full dump at 20k records
#   3. populate to 100k (80,000 ACTIVATEs, 16 connections x pipeline 16; timed, not compared)
#   4. update-sync at 100k, 5. LIST at 100k, 6. FIND at 8 connections (pipeline 1)
#   7. propagation: 40 ACTIVATEs 30 ms apart to a plain UPDATE subscriber that never NOOPs
# and prints a table (ours, Cyrus, ratio ours/Cyrus for throughputs and Cyrus/ours for
# latencies) with the targets checked, also written to OUTPUT_FILE; raw JSON per run is kept
# next to it in OUTPUT_FILE.d/.
#
# Needs root (cyrmaster drops to user cyrus), the Debian packages cyrus-common cyrus-murder
# sasl2-bin libsasl2-modules, python3, cargo. Everything it starts is stopped on exit.
# Env: CARGO_TARGET_DIR (default /work/target-bench), KEEP=1 keeps the temp dirs,
# WRITES / POPULATE_TO / FIND_OPS / PROP_CHANGES override the sizes (for a quick smoke run).
set -euo pipefail

OUT=${1:-./mupdate-compare.txt}
OUT=$(realpath -m "$OUT")
RAW="$OUT.d"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-bench}
BIN="$CARGO_TARGET_DIR/release"
WRITES=${WRITES:-20000}
POPULATE_TO=${POPULATE_TO:-100000}
FIND_OPS=${FIND_OPS:-200000}
PROP_CHANGES=${PROP_CHANGES:-40}
CYRUS_LIBEXEC=${CYRUS_LIBEXEC:-/usr/lib/cyrus/bin}
CYRMASTER=${CYRMASTER:-/usr/sbin/cyrmaster}
SASLPASSWD2=${SASLPASSWD2:-/usr/sbin/saslpasswd2}
CYRUS_USER=mupdateadmin
CYRUS_PASSWORD=bench-pw-$$
T0=$(date +%s)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

log() { printf '[%s +%ss] %s\n' "$(date +%H:%M:%S)" "$(( $(date +%s) - T0 ))" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root: cyrmaster must start as root to drop to user cyrus"
for b in "$CYRMASTER" "$SASLPASSWD2" "$CYRUS_LIBEXEC/mupdate" "$CYRUS_LIBEXEC/ctl_cyrusdb"; do
    [ -x "$b" ] || die "$b missing (apt-get install -y cyrus-common cyrus-murder sasl2-bin libsasl2-modules)"
done
id cyrus >/dev/null 2>&1 || die "user cyrus missing (install cyrus-common)"
command -v python3 >/dev/null || die "python3 missing"

OURS_DIR= CYRUS_DIR= OURS_PID= SYSLOG_PID=
cleanup() {
    set +e
    if [ -n "$OURS_PID" ] && kill -0 "$OURS_PID" 2>/dev/null; then
        kill -TERM "$OURS_PID"; wait "$OURS_PID" 2>/dev/null
    fi
    if [ -n "$CYRUS_DIR" ] && [ -f "$CYRUS_DIR/cyrmaster.pid" ]; then
        local pid; pid=$(cat "$CYRUS_DIR/cyrmaster.pid")
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            # cyrmaster stops its services on SIGTERM; its children are noted first (by pid)
            # so that none of them can outlive it.
            local kids; kids=$(ps -o pid= --ppid "$pid" 2>/dev/null)
            kill -TERM "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
            for k in $kids; do kill -0 "$k" 2>/dev/null && kill -KILL "$k"; done
        fi
    fi
    if [ -n "$SYSLOG_PID" ]; then
        kill -TERM "$SYSLOG_PID" 2>/dev/null; wait "$SYSLOG_PID" 2>/dev/null
    fi
    if [ "${KEEP:-0}" != 1 ]; then
        [ -n "$OURS_DIR" ] && rm -rf "$OURS_DIR"
        [ -n "$CYRUS_DIR" ] && rm -rf "$CYRUS_DIR"
    else
        log "kept $OURS_DIR $CYRUS_DIR"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Wait until a connection reads a `* OK` banner line.
wait_banner() {
    python3 - "$1" "$2" <<'EOF'
import socket, sys, time
port, limit = int(sys.argv[1]), float(sys.argv[2])
end = time.time() + limit
while time.time() < end:
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=2)
        s.settimeout(5)
        buf = b""
        while b"* OK" not in buf:
            d = s.recv(4096)
            if not d:
                break
            buf += d
        s.close()
        if b"* OK" in buf:
            line = [l for l in buf.split(b"\r\n") if l.startswith(b"* OK")][0]
            print(line.decode(errors="replace"))
            sys.exit(0)
    except OSError:
        pass
    time.sleep(0.2)
sys.exit(1)
EOF
}

mkdir -p "$RAW"
log "building release binaries in $CARGO_TARGET_DIR"
(cd "$REPO" && cargo build --release -p mupdate-tools --bin mupdated --bin mupdate-bench 2>&1 | tail -n 2) >&2
[ -x "$BIN/mupdated" ] && [ -x "$BIN/mupdate-bench" ] || die "build produced no binaries"

# Cyrus logs only to /dev/log; capture it if nobody listens (diagnostics only).
SYSLOG_FILE="$RAW/cyrus-syslog.log"
if ! python3 -c 'import socket; s=socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.connect("/dev/log")' 2>/dev/null; then
    python3 - "$SYSLOG_FILE" <<'EOF' &
import os, socket, sys
try:
    os.unlink("/dev/log")
except FileNotFoundError:
    pass
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind("/dev/log")
os.chmod("/dev/log", 0o666)
with open(sys.argv[1], "ab", buffering=0) as f:
    while True:
        f.write(s.recv(65536).rstrip(b"\0\n") + b"\n")
EOF
    SYSLOG_PID=$!
fi

# ---- our master
OURS_DIR=$(mktemp -d /tmp/mupdate-cmp-ours.XXXXXX)
OURS_PORT=$(free_port)
MUPDATE_LOG=warn "$BIN/mupdated" serve --listen "127.0.0.1:$OURS_PORT" --data-dir "$OURS_DIR" \
    --servername ours-master --failed-login-pause 0 >"$RAW/ours-mupdated.log" 2>&1 &
OURS_PID=$!
OURS_BANNER=$(wait_banner "$OURS_PORT" 30) || die "our master gave no banner; see $RAW/ours-mupdated.log"
log "ours: $OURS_BANNER (port $OURS_PORT, pid $OURS_PID)"

# ---- Cyrus master (recipe of /work/shared/spec/running-cyrus.md)
CYRUS_DIR=$(mktemp -d /tmp/mupdate-cmp-cyrus.XXXXXX)
chmod 755 "$CYRUS_DIR"
mkdir -p "$CYRUS_DIR"/config/{db,socket,proc,lock,log} "$CYRUS_DIR/spool"
CYRUS_PORT=$(free_port)
cat >"$CYRUS_DIR/imapd.conf" <<EOF
configdirectory: $CYRUS_DIR/config
partition-default: $CYRUS_DIR/spool
servername: cyrus-master
admins: $CYRUS_USER
allowplaintext: yes
sasl_pwcheck_method: auxprop
sasl_auxprop_plugin: sasldb
sasl_sasldb_path: $CYRUS_DIR/sasldb2
mupdate_config: standard
syslog_prefix: cyrus-bench-$$
EOF
cat >"$CYRUS_DIR/cyrus.conf" <<EOF
START {
  recover cmd="$CYRUS_LIBEXEC/ctl_cyrusdb -C $CYRUS_DIR/imapd.conf -r"
}
SERVICES {
  mupdate cmd="$CYRUS_LIBEXEC/mupdate -C $CYRUS_DIR/imapd.conf -m" listen="127.0.0.1:$CYRUS_PORT" prefork=1
}
EVENTS {
  checkpoint cmd="$CYRUS_LIBEXEC/ctl_cyrusdb -C $CYRUS_DIR/imapd.conf -c" period=30
}
EOF
printf '%s' "$CYRUS_PASSWORD" | "$SASLPASSWD2" -p -c -f "$CYRUS_DIR/sasldb2" -u cyrus-master "$CYRUS_USER"
printf '%s\n' "$CYRUS_PASSWORD" >"$CYRUS_DIR/bench-password"
chown -R cyrus:mail "$CYRUS_DIR"
"$CYRMASTER" -C "$CYRUS_DIR/imapd.conf" -M "$CYRUS_DIR/cyrus.conf" -p "$CYRUS_DIR/cyrmaster.pid" \
    -d -L "$CYRUS_DIR/cyrmaster.log" </dev/null
CYRUS_BANNER=$(wait_banner "$CYRUS_PORT" 60) \
    || die "Cyrus gave no banner; see $CYRUS_DIR/cyrmaster.log and $SYSLOG_FILE (KEEP=1 keeps them)"
log "cyrus: $CYRUS_BANNER (port $CYRUS_PORT, cyrmaster pid $(cat "$CYRUS_DIR/cyrmaster.pid"))"

# bench NAME WHO ARGS...: one mupdate-bench run, JSON kept in $RAW/NAME-WHO.json.
bench() {
    local name=$1 who=$2; shift 2
    local server pwfile user
    if [ "$who" = ours ]; then
        server=127.0.0.1:$OURS_PORT pwfile=$OURS_DIR/admin-password user=admin
    else
        server=127.0.0.1:$CYRUS_PORT pwfile=$CYRUS_DIR/bench-password user=$CYRUS_USER
    fi
    local t=$(date +%s.%N)
    if ! "$BIN/mupdate-bench" --server "$server" --user "$user" --password-file "$pwfile" \
        --label "$who" --json --time-limit 1800 "$@" >"$RAW/$name-$who.json" 2>"$RAW/$name-$who.err"; then
        log "WARNING: $name on $who did not complete: $(tail -n 3 "$RAW/$name-$who.err")"
    fi
    log "$name $who: $(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); r=d.get("result") or d.get("populate") or {}; print(r.get("count"), "in", round(r.get("elapsed_s",0),3), "s,", round(r.get("throughput",0),1), r.get("unit"))' "$RAW/$name-$who.json" 2>/dev/null || echo '?') [wall $(python3 -c "import time;print(round(time.time()-$t,1))")s]"
}

for who in ours cyrus; do
    bench write "$who" -w write -n "$WRITES" -c 32 -P 1 --prefix user.bw.
done
for who in ours cyrus; do bench sync20k "$who" -w update-sync --repeat 5; done
for who in ours cyrus; do
    bench populate "$who" -w none --populate $((POPULATE_TO - WRITES)) --populate-connections 16 \
        --populate-pipeline 16 --prefix user.bp.
done
for who in ours cyrus; do bench sync100k "$who" -w update-sync --repeat 5; done
for who in ours cyrus; do bench list100k "$who" -w list --repeat 5; done
for who in ours cyrus; do
    bench find "$who" -w find --ops "$FIND_OPS" -c 8 -P 1 --existing "$WRITES" --prefix user.bw.
done
for who in ours cyrus; do
    bench propagation "$who" -w propagation --changes "$PROP_CHANGES" --interval-ms 30 \
        --settle-secs 15 --prefix user.bprop.
done

TOTAL=$(( $(date +%s) - T0 ))
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
python3 - "$RAW" "$OUT" "$TOTAL" "$OURS_BANNER" "$CYRUS_BANNER" "$WRITES" "$POPULATE_TO" "$LOAD_START" "$LOAD_END" <<'EOF'
import json, os, platform, sys
raw, out, total, ours_banner, cyrus_banner, writes, pop_to, load0, load1 = sys.argv[1:10]
def load(name, who):
    try:
        with open(os.path.join(raw, f"{name}-{who}.json")) as f:
            d = json.load(f)
        return d.get("result") or d.get("populate")
    except (OSError, ValueError):
        return None
def thr(r):
    return r["throughput"] if r else None
def lat(key, q):
    return lambda r: r["latency_ms"][key][q] if r and key in r["latency_ms"] else None
rows = [
    # label, run, extractor, unit, higher_is_better, target (ratio or absolute on ours)
    (f"write {int(writes)//1000}k mailboxes, 32 conn, P1", "write", thr, "mbox/s", True, ("ratio", 10)),
    ("  write: mailbox latency p50", "write", lat("mailbox", "p50"), "ms", False, None),
    ("  write: mailbox latency p99", "write", lat("mailbox", "p99"), "ms", False, None),
    (f"UPDATE dump at {int(writes)//1000}k (p50 of 5)", "sync20k", lat("run", "p50"), "ms", False, ("ratio", 5)),
    (f"UPDATE dump at {int(pop_to)//1000}k (p50 of 5)", "sync100k", lat("run", "p50"), "ms", False, ("ratio", 5)),
    (f"LIST at {int(pop_to)//1000}k (p50 of 5)", "list100k", lat("run", "p50"), "ms", False, None),
    ("FIND, 8 conn, P1", "find", thr, "ops/s", True, None),
    ("  FIND latency p99", "find", lat("find", "p99"), "ms", False, None),
    ("propagation p50 (no NOOP)", "propagation", lat("propagation", "p50"), "ms", False, None),
    ("propagation p99 (no NOOP)", "propagation", lat("propagation", "p99"), "ms", False, ("ours_max", 5)),
    (f"populate {(int(pop_to)-int(writes))//1000}k (16 conn x P16, ACTIVATE)", "populate", thr, "mbox/s", True, None),
]
def fmt(v):
    if v is None: return "n/a"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.3f}"
lines = []
lines.append(f"MUPDATE master comparison on {platform.node()} ({os.cpu_count()} CPUs, {platform.platform()})")
lines.append(f"  load average (1/5/15 min) at start {load0}, at end {load1}")
lines.append(f"  ours : {ours_banner}")
lines.append(f"  cyrus: {cyrus_banner}")
hdr = f"{'metric':<46} {'unit':<7} {'ours':>12} {'cyrus':>12} {'ratio':>9}  target"
lines.append(hdr)
lines.append("-" * len(hdr))
for label, run, ex, unit, higher, target in rows:
    o, c = ex(load(run, "ours")), ex(load(run, "cyrus"))
    ratio = None
    if o is not None and c is not None:
        if higher and c > 0: ratio = o / c
        elif not higher and o > 0: ratio = c / o
    rtxt = f"{ratio:,.1f}x" if ratio is not None else "n/a"
    ttxt = ""
    if target:
        kind, v = target
        if kind == "ratio":
            ok = ratio is not None and ratio >= v
            ttxt = f">= {v}x: {'PASS' if ok else 'MISS'}"
        else:
            ok = o is not None and o <= v
            ttxt = f"ours <= {v} ms: {'PASS' if ok else 'MISS'}"
    lines.append(f"{label:<46} {unit:<7} {fmt(o):>12} {fmt(c):>12} {rtxt:>9}  {ttxt}")
problems = []
for f in sorted(os.listdir(raw)):
    if f.endswith(".json"):
        try:
            d = json.load(open(os.path.join(raw, f)))
        except ValueError:
            problems.append(f"{f}: no JSON (see .err)"); continue
        for k in ("populate", "result"):
            r = d.get(k)
            if r and (r.get("errors") or not r.get("complete")):
                problems.append(f"{f} {k}: errors={r.get('errors')} complete={r.get('complete')} first_error={r.get('first_error')}")
lines.append("")
lines.append("ratio = ours/cyrus for throughputs, cyrus/ours for latencies and times.")
lines.append("p99 of 40 propagation samples is their maximum: one scheduling hiccup decides it.")
lines.append(f"total runtime of the comparison: {int(total)} s; raw JSON in {raw}/")
if problems:
    lines.append("problems:")
    lines.extend("  " + p for p in problems)
text = "\n".join(lines) + "\n"
sys.stdout.write(text)
with open(out, "w") as f:
    f.write(text)
EOF
log "done in ${TOTAL}s; table in $OUT"

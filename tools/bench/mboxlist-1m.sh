#!/usr/bin/env bash
# mboxlist on a 1,000,000-mailbox Cyrus 3.6.1 twoskip mailboxes.db written by the real Cyrus
# tools, in one run:
#
#   tools/bench/mboxlist-1m.sh [--variant backend|murder|both] [N]   (default both, 1000000)
#
# For each variant:
# 1. writes a `cyr_dbtool` batch (python3) of N mailboxes (100 folders per user, ACLs) and has
#    `cyr_dbtool -C imapd.conf -n mailboxes.db twoskip batch` build the file. `backend`: a 3.6
#    backend's file, each mailbox an `N` record and its `I` record (uniqueids, modseqs; the
#    I keys sort first). `murder`: a murder frontend's/master's file, `N` records only
#    (`%(T er P … S … M … A …)`, 10 backend servers);
# 2. `mboxlist dump FILE` vs `ctl_mboxlist -d` on the same file: elapsed time and peak RSS
#    (/usr/bin/time -f '%e %M'), outputs compared byte for byte;
# 3. `mboxlist import --data-dir DIR FILE` into a new LMDB store (time, RSS, store size), then
#    `mboxlist export` back to twoskip and `mboxlist kv` of both files compared.
# Prints a table. Needs root or the cyrus user (the Cyrus tools), Debian cyrus-common,
# python3, cargo. Env: CARGO_TARGET_DIR (default /work/target-bench), KEEP=1 keeps the temp
# dir.
#
# Measured on the project's 2-core machine kind (release build; last run in
# mboxlist-1m-last-run.txt): murder file (1M records, 145 MB) mboxlist dump 1.03 s / 9.6 MB
# peak RSS vs ctl_mboxlist -d 12.73 s / 153.9 MB; backend file (2M records, 408 MB) 1.17 s /
# 9.4 MB vs 14.21 s / 208.6 MB; outputs identical; import 4.53 s and 6.42 s. The dump seeks
# to the first `N` key along the skip pointers (as ctl_mboxlist -d does) and hands the pages
# it has read back to the kernel as it goes, so its RSS does not grow with the file.
set -euo pipefail

VARIANT=both
if [ "${1:-}" = --variant ]; then VARIANT=${2:?--variant needs backend, murder or both}; shift 2; fi
case $VARIANT in backend | murder) VARIANTS=$VARIANT ;; both) VARIANTS="murder backend" ;;
    *) echo "unknown variant: $VARIANT" >&2; exit 2 ;; esac
N=${1:-1000000}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-bench}
BIN="$CARGO_TARGET_DIR/release/mboxlist"
LIBEXEC=${CYRUS_LIBEXEC:-/usr/lib/cyrus/bin}
TIME=/usr/bin/time

for t in "$LIBEXEC/cyr_dbtool" "$LIBEXEC/ctl_mboxlist" "$TIME" python3 cargo; do
    command -v "$t" >/dev/null || { echo "missing: $t" >&2; exit 2; }
done

echo "building mboxlist (release)..." >&2
(cd "$REPO" && cargo build --release -q -p mupdate-tools --bin mboxlist)

W=
cleanup() {
    if [ -z "$W" ]; then return; fi
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $W" >&2; else rm -rf "$W"; fi
    W=
}
trap cleanup EXIT

run_variant() { # backend|murder
W=$(mktemp -d /tmp/mboxlist-1m.XXXXXX)
mkdir -p "$W/conf/db" "$W/spool"
cat > "$W/imapd.conf" <<EOF
configdirectory: $W/conf
partition-default: $W/spool
virtdomains: userid
mboxlist_db: twoskip
EOF
DB="$W/conf/mailboxes.db"

echo "$1: writing the batch input ($N mailboxes)..." >&2
python3 - "$N" "$1" > "$W/batch" <<'PY'
import sys
n = int(sys.argv[1])
murder = sys.argv[2] == "murder"
out = sys.stdout.buffer
def lit(b):
    return b"{%d+}\r\n" % len(b) + b
out.write(b"BEGIN\n")
folders = [b"INBOX"] + [b"Folder%02d" % i for i in range(99)]
for i in range(n):
    user, f = divmod(i, 100)
    uname = b"u%06d" % user
    dbname = b"user\x1f" + uname + (b"" if f == 0 else b"\x1f" + folders[f])
    uid = b"5eed0000-0000-4000-8000-%012x" % i
    acl = b"%(" + uname + b" lrswipkxtecdan anyone lrs)"
    if murder:
        nval = b"%(T er P default S " + b"backend%02d" % (user % 10) + b" M 1700000000 A " + acl + b")"
        out.write(b"SET " + lit(b"N" + dbname) + b" " + lit(nval) + b"\n")
        continue
    common = b" P default V %d C %d F %d M 1700000000 A " % (1690000000 + i, i % 1000 + 1, i % 100000 + 1)
    nval = b"%(T e I " + uid + common + acl + b")"
    ival = b"%(T e N " + dbname + common + acl + b" H ())"
    out.write(b"SET " + lit(b"N" + dbname) + b" " + lit(nval) + b"\n")
    out.write(b"SET " + lit(b"I" + uid) + b" " + lit(ival) + b"\n")
out.write(b"COMMIT\n")
PY
if [ "$(id -u)" = 0 ]; then chown -R cyrus:mail "$W"; fi
t0=$(date +%s.%N)
"$LIBEXEC/cyr_dbtool" -C "$W/imapd.conf" -n "$DB" twoskip batch < "$W/batch" > /dev/null
t1=$(date +%s.%N)
rm -f "$W/batch"
SIZE=$(stat -c %s "$DB")
echo "cyr_dbtool wrote $DB ($SIZE bytes) in $(echo "$t1 - $t0" | bc) s" >&2

measure() { # label outfile cmd... -> "label elapsed rss_kb"
    local label=$1 out=$2; shift 2
    $TIME -f '%e %M' -o "$W/time.$label" "$@" > "$out"
    echo "$label $(cat "$W/time.$label")"
}

R1=$(measure ours-dump "$W/ours.json" "$BIN" -q dump "$DB")
R2=$(measure cyrus-dump "$W/cyrus.json" "$LIBEXEC/ctl_mboxlist" -C "$W/imapd.conf" -d)
if cmp -s "$W/ours.json" "$W/cyrus.json"; then SAME=identical; else SAME=DIFFERENT; fi
DUMPSIZE=$(stat -c %s "$W/cyrus.json")
rm -f "$W/ours.json" "$W/cyrus.json"
R3=$(measure import /dev/null "$BIN" -q import --data-dir "$W/store" "$DB")
STORE=$(du -sb "$W/store" | cut -f1)
R4=$(measure export /dev/null "$BIN" -q export --data-dir "$W/store" "$W/export.db" --backend twoskip)
if cmp -s <("$BIN" kv "$DB") <("$BIN" kv "$W/export.db"); then RT=identical; else RT=DIFFERENT; fi

row() { # label elapsed rss_kb
    printf '%-44s %10s s %10.1f MB\n' "$1" "$2" "$(echo "$3 / 1024" | bc -l)"
}
if [ "$1" = murder ]; then RECS=$N; else RECS=$((2 * N)); fi
echo
echo "$1 variant: mboxlist on $N mailboxes ($RECS records, $SIZE-byte twoskip written by cyr_dbtool), $(nproc) cores"
printf '%-44s %12s %13s\n' "step" "elapsed" "peak RSS"
set -- $R1; row "mboxlist dump (ours)" "$2" "$3"
set -- $R2; row "ctl_mboxlist -d (Cyrus 3.6.1)" "$2" "$3"
echo "  dump outputs: $SAME ($DUMPSIZE bytes)"
set -- $R3; row "mboxlist import -> LMDB" "$2" "$3"
echo "  store: $STORE bytes"
set -- $R4; row "mboxlist export -> twoskip" "$2" "$3"
echo "  records of export vs original: $RT"
cleanup
}

for v in $VARIANTS; do run_variant "$v"; done

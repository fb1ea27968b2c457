#!/bin/sh
# xenpbr-agent's salvage without Python: `salvage.sh PHASE [--config PATH]`.
#
# The packaged xenpbr-agent runs this instead of the agent when no Python 3.9 or later
# can run it (python3 removed, broken, or too old). Like the agent's own salvage of a
# broken config (docs/phase-protocol.md, "salvage"), it marks no boundary, and still
# brings the guest up: it runs PHASE's [phase:PHASE] start commands and, when PHASE is
# the last [phase:...] in the config, the [after-last-phase] mounts and starts. It tells
# dom0 why there is no image (data/xenpbr/problem, when xenstore-write is installed),
# prints "PHASE not-marked" and exits 2, so the unit shows failed.
#
# POSIX sh and awk only. Commands run through sh -c (the agent itself splits them
# without a shell: keep config lines to plain commands and arguments).
set -u
phase=${1:?usage: salvage.sh PHASE [--config PATH]}
conf=${XENPBR_AGENT_CONFIG:-/etc/xenpbr/agent.conf}
if [ "${2:-}" = --config ] && [ -n "${3:-}" ]; then conf=$3; fi
tab=$(printf '\t')
rc=2

log() { echo "xenpbr-agent: $*" >&2; }

log "error: no Python 3.9 or later can run the agent (python3:" \
    "$(command -v python3 || echo not found)): boundary $phase is not marked; running" \
    "what $conf names for it"
if command -v xenstore-write >/dev/null 2>&1; then
    xenstore-write data/xenpbr/problem \
        "no-python $phase python3 (>= 3.9) cannot run xenpbr-agent; boot salvaged by the shell" \
        2>/dev/null || log "warning: cannot write data/xenpbr/problem"
fi
echo "$phase not-marked"
if [ ! -r "$conf" ]; then
    log "error: cannot read $conf: nothing to salvage"
    exit 2
fi

# One "section<TAB>key<TAB>value" line per value (continuation lines included), then
# "<TAB>last<TAB>PHASE" naming the last [phase:...] section.
records=$(awk '
function trim(s) { sub(/^[ \t]+/, "", s); sub(/[ \t\r]+$/, "", s); return s }
/^[ \t]*([#;]|\r?$)/ { next }
/^\[/ { sec = trim($0); sub(/^\[/, "", sec); sub(/\].*$/, "", sec); key = ""
        if (sec ~ /^phase:/) last = substr(sec, 7); next }
/^[ \t]/ { if (key != "") print sec "\t" key "\t" trim($0); next }
{ i = index($0, "="); if (i == 0) { key = ""; next }
  key = trim(substr($0, 1, i - 1)); v = trim(substr($0, i + 1))
  if (v != "") print sec "\t" key "\t" v }
END { print "\tlast\t" last }' "$conf")
last=$(printf '%s\n' "$records" | sed -n "s/^${tab}last${tab}//p")

run() {  # section key: each of its values, in order
    want_sec=$1 want_key=$2
    printf '%s\n' "$records" | while IFS="$tab" read -r sec key value; do
        [ "$sec" = "$want_sec" ] && [ "$key" = "$want_key" ] || continue
        if [ "$want_key" = mount ]; then
            # DEVICE MOUNTPOINT [FSTYPE [OPTIONS]]; a mounted mount point is left alone
            set -f; set -- $value; set +f
            if mountpoint -q "$2" 2>/dev/null; then
                log "$2 is already mounted"; continue
            fi
            log "mounting $1 on $2"
            mkdir -p "$2" && mount ${3:+-t "$3"} ${4:+-o "$4"} "$1" "$2" \
                || log "error: mount $1 $2 failed"
        else
            log "running: $value"
            sh -c "$value" || log "error: '$value' failed"
        fi
    done
}

run "phase:$phase" start
if [ "$phase" = "$last" ]; then
    run after-last-phase mount
    run after-last-phase start
fi
exit $rc

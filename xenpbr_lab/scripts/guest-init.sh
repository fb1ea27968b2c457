#!/bin/sh
# PID 1 of the lab's busybox PV guest. What it does is chosen on the kernel command line
# (xl's `extra`): lab.mode=count prints a counter every second, lab.mode=crash prints a
# marker and crashes the kernel, lab.mode=service announces a ready service and waits,
# lab.mode=memmark keeps a marker string in memory, lab.mode=probe checks xenstore,
# lab.mode=agent runs the guest agent for each phase of lab.phases=a,b, lab.mode=hostile
# writes bad requests first, lab.mode=flood floods xenstored with bad and repeated
# requests on its own, lab.mode=deluge floods well-formed requests for a while then
# sends bad ones, lab.mode=calm times its agent's boundaries, lab.mode=demo runs the
# demo application, lab.mode=shell just waits.
export PATH=/usr/bin:/usr/sbin:/bin:/sbin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu
# no byte-code written into the image's root disk: every boot of it starts the same
export PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=/usr/lib/python3/dist-packages
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null

# lab.root=DEV (xenpbr-lab consistency): the root file system is an ext4 disk. From the
# initramfs: load the block and ext4 modules, mount DEV, move /proc /sys /dev onto it and
# switch to it; this script then runs again as PID 1 from the disk (/.lab-disk-root).
root=$(sed -n 's/.*lab\.root=\([^ ]*\).*/\1/p' /proc/cmdline)
if [ -n "$root" ] && [ ! -e /.lab-disk-root ]; then
    while read -r ko; do insmod "$ko" 2>/dev/null; done < /etc/xenpbr-lab/modules
    i=0
    while [ ! -b "$root" ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
    mkdir -p /newroot
    if mount -t ext4 -o noatime "$root" /newroot; then
        for m in /dev /sys /proc; do mount --move "$m" "/newroot$m"; done
        exec switch_root /newroot /init
    fi
    echo "XENPBR-GUEST: cannot mount the root disk $root; staying in the initramfs"
fi
if [ -e /.lab-disk-root ]; then
    mount -t tmpfs tmpfs /tmp
    echo "XENPBR-GUEST: root disk $(grep ' / ' /proc/mounts | cut -d' ' -f1,3,4)"
fi
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
[ -d /proc/xen ] && mount -t xenfs xenfs /proc/xen 2>/dev/null
# Debian masks most sysrq functions; the lab crashes guests with `xl sysrq DOMAIN c`.
echo 1 > /proc/sys/kernel/sysrq

mode=shell
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        lab.mode=*) mode=${arg#lab.mode=} ;;
        lab.marker=*) marker=${arg#lab.marker=} ;;
        lab.phases=*) phases=$(echo "${arg#lab.phases=}" | tr , ' ') ;;
        lab.docs=*) docs=${arg#lab.docs=} ;;
        lab.workload=*) workload=${arg#lab.workload=} ;;
        lab.hazard=*) hazard=${arg#lab.hazard=} ;;
        lab.invalidate=*) invalidate=${arg#lab.invalidate=} ;;
        lab.agentconf=*) agentconf=${arg#lab.agentconf=} ;;
        lab.flood=*) flood=${arg#lab.flood=} ;;
        lab.rate=*) rate=${arg#lab.rate=} ;;
        lab.keys=*) keys=${arg#lab.keys=} ;;
        lab.hostile=*) hostile=${arg#lab.hostile=} ;;
        lab.watchdog=*) watchdog=${arg#lab.watchdog=} ;;
        lab.kallsyms=*) kallsyms=${arg#lab.kallsyms=} ;;
        lab.heartbeat=*) heartbeat=${arg#lab.heartbeat=} ;;
        lab.lkdtm=*) lkdtm=${arg#lab.lkdtm=} ;;
        lab.reach=*) reach=${arg#lab.reach=} ;;
    esac
done
# lab.lkdtm=1: LKDTM (built for this kernel by xenpbr_lab/lkdtm.py) and debugfs, where
# its DIRECT file is, for the agent's provoke-listener (consist_extras starts it).
if [ -n "$lkdtm" ]; then
    insmod "/lib/modules/$(uname -r)/extra/lkdtm.ko" || echo "XENPBR-GUEST: no LKDTM"
    mount -t debugfs debugfs /sys/kernel/debug
fi
# lab.reach=1: tracefs, where the agent's reach-counter arms its kprobes.
if [ -n "$reach" ]; then
    mount -t tracefs tracefs /sys/kernel/tracing || echo "XENPBR-GUEST: no tracefs"
fi
echo "XENPBR-GUEST: up uptime=$(cut -d' ' -f1 /proc/uptime) mode=$mode marker=${marker:-none}"
# Kernel text bounds from kallsyms (Debian's System.map is a stub), for vCPU RIP checks.
echo "XENPBR-GUEST: text $(grep -E ' (_stext|_etext)$' /proc/kallsyms | cut -d' ' -f1 | tr '\n' ' ')"

# agent/hostile (tests/lab/test_protocol_real.py): an agent config declaring lab.phases,
# then `xenpbr-agent phase P` for each. hostile first writes, one at a time, the requests
# dom0 left (escaped, as xenstore-read prints them) in control/xenpbr-lab/case/<n>,
# waiting until dom0 bumps control/xenpbr-lab/handled, then tries to forge an ack.
# lab.agentconf=typo (tests/lab/test_agent_config_real.py): the config misspells an
# [agent] key; `xenpbr-agent check` runs first and its output goes to the console.
agent_phases() {
    mkdir -p /etc/xenpbr
    { [ "$agentconf" = typo ] && printf '[agent]\nstep_timout = 30\n'
      for p in $phases; do echo "[phase:$p]"; done
      printf '[after-restore]\nrun = echo XENPBR-STEP: after-restore\n'
      printf '[after-last-phase]\nstart = echo XENPBR-STEP: after-last-phase\n'
    } > /etc/xenpbr/agent.conf
    if [ -n "$agentconf" ]; then
        python3 -m xenpbr_agent check > /run/agent-check.out 2>&1
        rc=$?
        sed 's/^/XENPBR-CHECK: /' /run/agent-check.out
        echo "XENPBR-CHECK: rc=$rc"
    fi
    for p in $phases; do
        out=$(PYTHONPATH=/usr/lib/python3/dist-packages python3 -m xenpbr_agent phase "$p")
        echo "XENPBR-AGENT: $out rc=$?"
    done
    # lab.invalidate=P: on the first boot only (never restored: no generation; a restored
    # guest comes back through this loop too), ask dom0 to drop the images from P on
    if [ -n "$invalidate" ] && python3 -m xenpbr_agent status --json | grep -q '"generation": null'; then
        out=$(python3 -m xenpbr_agent invalidate "$invalidate")
        echo "XENPBR-INVALIDATE: $out rc=$?"
    fi
}
# demo (make demo): three phases; services starts syslogd, app runs a real warm-up
# (xenpbr_lab.demo_app builds an index) and then answers with heartbeat lines.
demo_phases() {
    mkdir -p /etc/xenpbr
    cat > /etc/xenpbr/agent.conf <<CONF
[phase:kernel]
[phase:services]
start = syslogd -O /run/messages
[phase:app]
start = python3 -m xenpbr_lab.demo_app --documents ${docs:-60000}
CONF
    for p in kernel services app; do
        out=$(PYTHONPATH=/usr/lib/python3/dist-packages python3 -m xenpbr_agent phase "$p")
        echo "XENPBR-AGENT: $out rc=$?"
    done
}
# bench (xenpbr-lab bench): the phases of lab.workload=bare|services|app, then the
# "service answering" signal: a heartbeat line every 0.2 s (the app workload's own).
bench_phases() {
    mkdir -p /etc/xenpbr
    case "${workload:-bare}" in
        app) demo_phases; return ;;
        services) list="kernel services"
            printf '[phase:kernel]\n[phase:services]\nstart = syslogd -O /run/messages\n  klogd\n' \
                > /etc/xenpbr/agent.conf ;;
        *) list=kernel; printf '[phase:kernel]\n' > /etc/xenpbr/agent.conf ;;
    esac
    for p in $list; do
        out=$(PYTHONPATH=/usr/lib/python3/dist-packages python3 -m xenpbr_agent phase "$p")
        echo "XENPBR-AGENT: $out rc=$?"
    done
    ( n=0; while :; do n=$((n + 1)); echo "XENPBR-APP: alive n=$n"; sleep 0.2; done ) &
}
# consist (xenpbr-lab consistency, on lab.root=/dev/xvda): phases kernel, services, app.
# The persistent data disk /dev/xvdb is mounted by the agent after the last phase, where
# the record writer starts, and with lab.hazard=after the non-O_APPEND logger too;
# lab.hazard=candidate starts the logger inside the app phase, with the data disk
# mounted: dom0 must refuse that boundary, naming the logger.
# xenpbr-lab faults adds lab.watchdog=S (busybox watchdog keeps Xen's watchdog, xen_wdt,
# from expiring while the kernel schedules: a hung kernel stops it and Xen shuts the
# domain down with reason watchdog within S seconds) and lab.kallsyms=1 (the kernel's
# symbols, once, to /data/kallsyms: Debian's System.map is a placeholder) and
# lab.heartbeat=S (the agent's heartbeat every S seconds, for dom0's liveness check)
# and lab.lkdtm=1 (the agent's provoke-listener: xenpbr inject --fault lkdtm:TYPE)
# and lab.reach=1 (the agent's reach-counter: xenpbr inject --count-runs);
# lab.keys=K (with lab.rate=N) also starts the resurrection proof's key-value application
# after the last phase (its region resurrected by dom0 after a crash: xenpbr_resurrect).
consist_extras() {
    if [ -n "$heartbeat" ]; then
        printf '  sh -c "exec python3 -m xenpbr_agent heartbeat --interval %s >/dev/hvc0 2>&1 &"\n' \
            "$heartbeat"
    fi
    if [ -n "$watchdog" ]; then
        printf '  sh -c "exec watchdog -F -T %s -t 2 /dev/watchdog >/dev/hvc0 2>&1 &"\n' \
            "$watchdog"
    fi
    if [ -n "$lkdtm" ]; then
        printf '  sh -c "exec python3 -m xenpbr_agent provoke-listener >/dev/hvc0 2>&1 &"\n'
    fi
    if [ -n "$reach" ]; then
        printf '  sh -c "exec python3 -m xenpbr_agent reach-counter >/dev/hvc0 2>&1 &"\n'
    fi
    if [ -n "$kallsyms" ]; then
        ks="[ -s /data/kallsyms ] || { awk 'NF==3' /proc/kallsyms > /data/kallsyms; sync; }"
        printf '  sh -c "%s; echo XENPBR-KALLSYMS: $(wc -l < /data/kallsyms) >/dev/hvc0"\n' "$ks"
    fi
}
consist_phases() {
    mkdir -p /etc/xenpbr
    w="python3 -m xenpbr_lab.disk_workload"
    { printf '[phase:kernel]\n[phase:services]\nstart = syslogd -O /run/messages\n[phase:app]\n'
      if [ "$hazard" = candidate ]; then
          printf 'start = mount -t ext4 -o noatime /dev/xvdb /data\n'
          printf '  sh -c "exec %s logger /data/logger.log >/dev/hvc0 2>&1 &"\n' "$w"
          printf '  sh -c "while [ ! -s /data/logger.log ]; do sleep 0.1; done"\n'
      fi
      if [ -n "$keys" ]; then
          printf '[resurrect]\nkvdemo = sh -c "echo XENPBR-RESURRECTED: kvdemo >/dev/hvc0"\n'
      fi
      printf '[after-last-phase]\nmount = /dev/xvdb /data ext4 noatime\n'
      printf 'start = sh -c "exec %s writer /data/records >/dev/hvc0 2>&1 &"\n' "$w"
      if [ -n "$keys" ]; then
          printf '  sh -c "exec python3 -m xenpbr_lab.resurrect_app --keys %s --rate %s >/dev/hvc0 2>&1 &"\n' \
              "$keys" "${rate:-5}"
      fi
      if [ "$hazard" = after ]; then
          printf '  sh -c "exec %s logger /data/logger.log >/dev/hvc0 2>&1 &"\n' "$w"
      fi
      consist_extras
    } > /etc/xenpbr/agent.conf
    for p in kernel services app; do
        out=$(python3 -m xenpbr_agent phase "$p"); rc=$?
        # after a restore with resurrection the agent also prints one line per hand-over
        echo "XENPBR-AGENT: $(echo "$out" | head -n 1) rc=$rc"
        echo "$out" | tail -n +2 | sed 's/^/XENPBR-HANDOVER: /'
    done
}
# resurrect (tests/lab/test_resurrection_real.py, xenpbr-lab resurrect): phases kernel,
# services, app; after the last phase the key-value application (xenpbr_lab.resurrect_app)
# starts, registers its region and writes lab.rate=N writes/s over lab.keys=K keys,
# printing each acknowledged write; its [resurrect] procedure announces the hand-over.
resurrect_phases() {
    mkdir -p /etc/xenpbr
    a="python3 -m xenpbr_lab.resurrect_app --keys ${keys:-50} --rate ${rate:-20}"
    { printf '[phase:kernel]\n[phase:services]\n[phase:app]\n'
      printf '[resurrect]\nkvdemo = sh -c "echo XENPBR-RESURRECTED: kvdemo >/dev/hvc0"\n'
      printf '[after-last-phase]\nstart = sh -c "exec %s >/dev/hvc0 2>&1 &"\n' "$a"
    } > /etc/xenpbr/agent.conf
    for p in kernel services app; do
        out=$(python3 -m xenpbr_agent phase "$p"); rc=$?
        # after a restore the agent also prints one line per hand-over
        echo "XENPBR-AGENT: $(echo "$out" | head -n 1) rc=$rc"
        echo "$out" | tail -n +2 | sed 's/^/XENPBR-HANDOVER: /'
    done
}
hostile_writes() {
    n=0
    while v=$(xenstore-read control/xenpbr-lab/case/$n 2>/dev/null); do
        h=$(xenstore-read control/xenpbr-lab/handled)
        if xenstore-write data/xenpbr/request "$v" 2>/dev/null; then
            i=0
            while [ "$(xenstore-read control/xenpbr-lab/handled)" = "$h" ] && [ $i -lt 600 ]; do
                sleep 0.1; i=$((i + 1))
            done
            echo "XENPBR-HOSTILE: $n written"
        else
            echo "XENPBR-HOSTILE: $n write-failed"
        fi
        n=$((n + 1))
    done
    xenstore-write control/xenpbr/ack "99 captured" 2>/dev/null
    echo "XENPBR-HOSTILE: forge-ack rc=$?"
}

# flood (tests/lab/test_phasereboot_real.py): with xenpbrd serving, write requests as
# fast as the shell can: oversized, broken JSON, a nesting bomb, names with '/' and '..',
# an undeclared phase, replayed and backwards seqs, and a burst of well-formed
# boundaries; then forge an ack, then run the agent as usual.
flood_writes() {
    big=$(head -c 4000 /dev/zero | tr '\0' a)
    ok() { echo "{\"v\":1,\"seq\":$1,\"phase\":\"$2\",\"phases\":[\"kernel\"],\"identity\":\"x\",\"wait\":60,\"disks\":[],\"services\":[],\"hazards\":[]}"; }
    n=0
    for v in "$big" '{"v":1,' "$(head -c 1500 /dev/zero | tr '\0' '[')" "$(ok 900 ../../etc)" \
             "$(ok 901 a/b)" "$(ok 902 nosuchphase)" "$(ok 5 kernel)" "$(ok 5 kernel)" \
             "$(ok 3 kernel)" "$(ok -1 kernel)"; do
        xenstore-write data/xenpbr/request "$v" 2>/dev/null; n=$((n + 1))
    done
    i=10
    while [ $i -lt 70 ]; do
        xenstore-write data/xenpbr/request "$(ok $i kernel)" 2>/dev/null; i=$((i + 1))
    done
    xenstore-write control/xenpbr/ack "99 captured" 2>/dev/null
    echo "XENPBR-FLOOD: wrote $((n + 60)) requests, forge-ack rc=$?"
}

# deluge (tests/lab/test_hostile_real.py): issue 13's hostile guest, without the agent.
# Floods data/xenpbr/request with well-formed boundaries, each with a fresh seq, as fast
# as the shell can, until dom0 writes control/xenpbr-lab/stop (checked every 50 writes)
# or lab.flood=S seconds pass; then writes each bad request below with a fresh seq and
# waits (up to 120 s) for dom0's ack of that seq, printing "XENPBR-BAD: <case> <ack>".
deluge_writes() {
    req() {  # seq phase phases-json
        printf '{"v":1,"seq":%s,"phase":"%s","phases":%s,"identity":"x","wait":60,"disks":[],"services":[],"hazards":[]}' "$1" "$2" "${3:-[\"kernel\"]}"
    }
    up() { cut -d. -f1 /proc/uptime; }
    seq=1; n=0; t0=$(up); limit=${flood:-240}
    echo "XENPBR-DELUGE: flooding uptime=$t0"
    while :; do
        xenstore-write data/xenpbr/request "$(req $seq kernel)" 2>/dev/null
        seq=$((seq + 1)); n=$((n + 1))
        if [ $((n % 50)) -eq 0 ]; then
            xenstore-read control/xenpbr-lab/stop >/dev/null 2>&1 && break
            [ $(($(up) - t0)) -ge "$limit" ] && break
        fi
    done
    echo "XENPBR-DELUGE: wrote $n requests in $(($(up) - t0)) s"
    long=$(head -c 300 /dev/zero | tr '\0' p)
    nul='a\\u0000b'  # xenstore-write unescapes "\\": the guest writes JSON's \u0000
    for case in dotdot:../../etc slash:a/b "nul:$nul" "long:$long" undeclared:ghost \
                badlist:kernel undeclist:kernel; do
        label=${case%%:*}; phase=${case#*:}; seq=$((seq + 1)); list='["kernel"]'
        [ "$label" = badlist ] && list='["kernel","../x"]'
        [ "$label" = undeclist ] && list='["kernel","ghost"]'
        xenstore-write data/xenpbr/request "$(req $seq "$phase" "$list")"
        i=0; a=
        while [ $i -lt 1200 ]; do
            a=$(xenstore-read control/xenpbr/ack 2>/dev/null)
            case "$a" in "$seq "*) break ;; esac
            sleep 0.1; i=$((i + 1))
        done
        echo "XENPBR-BAD: $label seq=$seq ack=$a"
        sleep 1  # dom0's poller in the test sees every answer
    done
    echo "XENPBR-DELUGE: done"
}
# calm (tests/lab/test_hostile_real.py): the agent marks lab.phases, each boundary timed
# with the guest's uptime ("XENPBR-TIMED: <phase> <start> <end>"); then, once dom0 writes
# control/xenpbr-lab/again (after a recovery, say), the last phase is marked once more.
calm_phases() {
    mkdir -p /etc/xenpbr
    for p in $phases; do echo "[phase:$p]"; done > /etc/xenpbr/agent.conf
    for p in $phases; do
        t0=$(cut -d' ' -f1 /proc/uptime)
        out=$(python3 -m xenpbr_agent phase "$p"); rc=$?
        t1=$(cut -d' ' -f1 /proc/uptime)
        echo "XENPBR-AGENT: $out rc=$rc"
        echo "XENPBR-TIMED: $p $t0 $t1"
        last=$p
    done
    until xenstore-read control/xenpbr-lab/again >/dev/null 2>&1; do sleep 0.5; done
    out=$(python3 -m xenpbr_agent phase "$last")
    echo "XENPBR-AGENT: $out rc=$? again"
}

case "$mode" in
    agent)
        agent_phases ;;
    demo)
        demo_phases ;;
    hostile)
        hostile_writes
        agent_phases ;;
    flood)
        flood_writes
        agent_phases ;;
    deluge)
        deluge_writes ;;
    calm)
        calm_phases ;;
    bench)
        bench_phases ;;
    consist)
        consist_phases ;;
    resurrect)
        resurrect_phases
        # lab.hostile=1 (tests/lab/test_resurrection_hostile_real.py): hostile registrations
        # beside the application's own, again after every recovery
        if [ -n "$hostile" ]; then
            python3 -m xenpbr_lab.hostile_regions >/dev/hvc0 2>&1 &
        fi ;;
    count)
        i=0
        while true; do
            i=$((i + 1))
            echo "XENPBR-GUEST: count=$i uptime=$(cut -d' ' -f1 /proc/uptime)"
            sleep 1
        done ;;
    memmark)
        # A marker that exists only in guest memory (a tmpfs file); the console shows
        # only its random id, never the whole string.
        id=$(cat /proc/sys/kernel/random/uuid)
        printf 'XENPBR-MEMMARK-%s' "$id" > /run/memmark
        echo "XENPBR-GUEST: memmark id=$id" ;;
    probe)
        # dom0 may leave a note under control/ before the guest runs; wait briefly.
        sleep 1
        PYTHONPATH=/usr/lib/python3/dist-packages python3 -m xenpbr_lab.guest_probe ;;
    service)
        echo "XENPBR-GUEST: service ready uptime=$(cut -d' ' -f1 /proc/uptime)" ;;
    crash)
        echo "XENPBR-GUEST: crashing now"
        echo c > /proc/sysrq-trigger ;;
esac
exec setsid sh -c 'exec sh </dev/hvc0 >/dev/hvc0 2>&1'

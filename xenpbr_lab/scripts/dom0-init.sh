#!/bin/sh
# PID 1 of the lab's dom0: mount the basics, load the Xen driver modules, start the Xen
# daemons, then the control server the host drives everything through.
export PATH=/usr/lib/xen-4.17/bin:/usr/sbin:/usr/bin:/sbin:/bin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu
export PYTHONPATH=/usr/lib/python3/dist-packages:/usr/lib/xen-4.17/lib/python
export PYTHONDONTWRITEBYTECODE=1 HOME=/root
mark() { echo "XENPBR-LAB: $*"; }

mount -t proc proc /proc
# The root file system is the initramfs, a tmpfs capped at half of dom0's RAM: image
# stores, hot streams, checkpoints and guest disks all live there (a session once hit
# ENOSPC at 686 MB), so let it use 80 %.
mount -o remount,size=80% / || mark "growing the root tmpfs failed"
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /dev/shm
mkdir -p /run/xen /run/xenstored /var/lib/xen /var/lib/xenstored /var/log/xen/console \
    /var/run /var/lock
ln -sf /run/xen /var/run/xen
ln -sf /run/xenstored /var/run/xenstored
mark "kernel up $(cut -d' ' -f1 /proc/uptime)"

while read -r ko; do
    insmod "$ko" || mark "insmod $ko failed"
done < /etc/xenpbr-lab/modules

mount -t xenfs xenfs /proc/xen || mark "mounting xenfs failed"
xenstored --pid-file /run/xenstored.pid || mark "xenstored failed"
xen-init-dom0 || mark "xen-init-dom0 failed"
xenconsoled --pid-file=/run/xenconsoled.pid --log=guest --log-dir=/var/log/xen/console \
    || mark "xenconsoled failed"
mark "xen tools up $(cut -d' ' -f1 /proc/uptime)"

port=""
for n in /sys/class/virtio-ports/*/name; do
    [ "$(cat "$n" 2>/dev/null)" = "xenpbr.ctl" ] && port=/dev/$(basename "$(dirname "$n")")
done
if [ -n "$port" ]; then
    python3 -m xenpbr_lab.ctl_server "$port" > /var/log/ctl-server.log 2>&1 &
    mark "control server on $port"
else
    mark "no virtio port named xenpbr.ctl: the host cannot drive this dom0"
fi
mark "dom0 ready $(cut -d' ' -f1 /proc/uptime)"
exec setsid sh -c 'exec sh </dev/hvc0 >/dev/hvc0 2>&1'

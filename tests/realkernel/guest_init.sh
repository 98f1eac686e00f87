#!/bin/sh
# /init of the real-kernel test guest. Mounts the host folder shared over 9p (tag "host")
# on /host, runs /host/run.sh, records its exit status in /host/exit-code, powers off.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mkdir -p /run/vhci_hcd /var/run
echo "rk-init: start uptime=$(cut -d' ' -f1 /proc/uptime)"

rk_halt() {
    sync
    poweroff -f
    reboot -f
    echo o > /proc/sysrq-trigger
}

for m in $(cat /etc/rk-boot-modules); do
    modprobe "$m" || echo "rk-init: modprobe $m failed"
done

if ! mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 host /host; then
    echo "rk-init: FATAL: cannot mount the 9p share 'host'"
    rk_halt
fi

ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2

echo "ready=$(cut -d' ' -f1 /proc/uptime)" > /host/init-times
echo "rk-init: running /host/run.sh uptime=$(cut -d' ' -f1 /proc/uptime)"
cd /host
sh /host/run.sh > /host/run.log 2>&1
rc=$?
echo "done=$(cut -d' ' -f1 /proc/uptime)" >> /host/init-times
echo "$rc" > /host/exit-code
echo "rk-init: run.sh exited $rc uptime=$(cut -d' ' -f1 /proc/uptime)"
rk_halt

# Helpers for scenario scripts running inside the test guest (busybox ash).
# Sourced by /host/run.sh before the scenario script; copied into the 9p share on every run,
# so changing this file does not rebuild the guest image.
#
# Results go to /host/results.txt as key=value lines (parsed by guest.py); a later value for
# the same key replaces an earlier one.

RK_RESULTS=/host/results.txt

rk_result() { # KEY VALUE...
    local k
    k=$1
    shift
    printf '%s=%s\n' "$k" "$*" | tr -d '\r' >> "$RK_RESULTS"
}

rk_uptime() { cut -d' ' -f1 /proc/uptime; }

rk_mark() { # NAME: records uptime as t_NAME
    rk_result "t_$1" "$(rk_uptime)"
}

rk_fail() { # record an error message (the test asserts there are none)
    echo "rk: FAIL: $*" >&2
    rk_result "error_$(rk_uptime | tr -d .)" "$*"
}

rk_wait() { # SECONDS CMD...: poll (10/s) until CMD succeeds; 1 on deadline
    local n
    n=$(($1 * 10))
    shift
    while ! "$@" > /dev/null 2>&1; do
        n=$((n - 1))
        if [ "$n" -le 0 ]; then
            return 1
        fi
        sleep 0.1
    done
    return 0
}

rk_listening() { # PORT: a TCP socket listens on PORT
    netstat -ltn 2> /dev/null | grep -q ":$1 "
}

rk_start_usbipd() {
    usbipd -D || rk_fail "usbipd -D failed"
    rk_wait 15 rk_listening 3240 || rk_fail "usbipd is not listening on 3240"
}

rk_is_vhci() { # SYSFS_DEVICE_DIR: is it below a vhci_hcd controller?
    case "$(realpath "$1")" in
        */vhci_hcd.*) return 0 ;;
        *) return 1 ;;
    esac
}

rk_usb_devices() { # VID PID [local|vhci]: sysfs dirs of matching USB devices
    local d v where
    for d in /sys/bus/usb/devices/*; do
        case "${d##*/}" in *:*) continue ;; esac
        [ -f "$d/idVendor" ] || continue
        read -r v < "$d/idVendor"
        [ "$v" = "$1" ] || continue
        read -r v < "$d/idProduct"
        [ "$v" = "$2" ] || continue
        if rk_is_vhci "$d"; then where=vhci; else where=local; fi
        if [ -z "$3" ] || [ "$3" = "$where" ]; then
            echo "$d"
        fi
    done
}

rk_has_usb_device() { # VID PID WHERE
    [ -n "$(rk_usb_devices "$1" "$2" "$3")" ]
}

rk_local_busid() { # VID PID: busid of the first matching non-vhci device (waits up to 20 s)
    local d
    if ! rk_wait 20 rk_has_usb_device "$1" "$2" local; then
        rk_fail "no local device $1:$2"
        return 1
    fi
    d=$(rk_usb_devices "$1" "$2" local | head -n 1)
    echo "${d##*/}"
}

rk_bind() { # BUSID: export with usbip-host
    if ! usbip bind -b "$1"; then
        rk_fail "usbip bind -b $1 failed"
        return 1
    fi
    rk_wait 10 test -e "/sys/bus/usb/drivers/usbip-host/$1" || {
        rk_fail "$1 not bound to usbip-host"
        return 1
    }
}

rk_vhci_total() { # number of USB devices (not root hubs) on vhci ports
    local d c
    c=0
    for d in /sys/bus/usb/devices/*-*; do
        case "${d##*/}" in *:*) continue ;; esac
        rk_is_vhci "$d" && c=$((c + 1))
    done
    echo "$c"
}

rk_vhci_total_above() { [ "$(rk_vhci_total)" -gt "$1" ]; }

rk_attach() { # PORT BUSID [HOST]: usbip attach through HOST (default 10.0.2.2):PORT
    # Waits until the new device has enumerated: `usbip attach` run while an earlier
    # attached device is still enumerating fails with "open vhci_driver".
    local before
    before=$(rk_vhci_total)
    if ! usbip --tcp-port "$1" attach -r "${3:-10.0.2.2}" -b "$2"; then
        rk_fail "usbip --tcp-port $1 attach -r ${3:-10.0.2.2} -b $2 failed"
        return 1
    fi
    if ! rk_wait 30 rk_vhci_total_above "$before"; then
        rk_fail "attach of $2 via port $1: no new device enumerated on vhci"
        return 1
    fi
}

rk_vhci_device() { # VID PID [SECONDS]: wait for the device on a vhci port, print its dir
    if ! rk_wait "${3:-20}" rk_has_usb_device "$1" "$2" vhci; then
        rk_fail "device $1:$2 did not appear on vhci"
        return 1
    fi
    rk_usb_devices "$1" "$2" vhci
}

rk_block_of() { # SYSFS_DEVICE_DIR: block device name (sdX) below this USB device
    find "$(realpath "$1")/" -path '*/block/sd*' -maxdepth 8 -type d 2> /dev/null \
        | grep -E '/block/sd[a-z]+$' | head -n 1 | sed 's#.*/##'
}

rk_has_block() { [ -n "$(rk_block_of "$1")" ]; }

rk_wait_block() { # SYSFS_DEVICE_DIR [SECONDS]: wait for its disk, print sdX
    local b
    if ! rk_wait "${2:-30}" rk_has_block "$1"; then
        rk_fail "no block device below $1"
        return 1
    fi
    b=$(rk_block_of "$1")
    rk_wait 10 test -b "/dev/$b" || rk_fail "/dev/$b did not appear"
    echo "$b"
}

rk_vhci_port() { # LOCAL_BUSID (e.g. 3-1): vhci port number, from the status files
    cat /sys/devices/platform/vhci_hcd.*/status* 2> /dev/null \
        | awk -v b="$1" '$7 == b { p = $2; sub(/^0+/, "", p); print p + 0; exit }'
}

rk_gone() { ! test -e "/sys/bus/usb/devices/$1"; }

rk_detach() { # SYSFS_DEVICE_DIR of a vhci device
    local busid port
    busid=${1##*/}
    port=$(rk_vhci_port "$busid")
    if [ -z "$port" ]; then
        rk_fail "no vhci port for $busid"
        return 1
    fi
    usbip detach -p "$port" || {
        rk_fail "usbip detach -p $port failed"
        return 1
    }
    rk_wait 15 rk_gone "$busid" \
        || rk_fail "$busid still present after detach"
}

rk_interface_drivers() { # SYSFS_DEVICE_DIR: "if:driver" list of its interfaces
    local out i drv
    out=""
    for i in "$(realpath "$1")"/*:*; do
        [ -d "$i" ] || continue
        drv="-"
        if [ -e "$i/driver" ]; then drv=$(basename "$(readlink "$i/driver")"); fi
        out="$out ${i##*/}:$drv"
    done
    echo "$out" | sed 's/^ //'
}

rk_input_names() { # SYSFS_DEVICE_DIR: names of input devices below it
    local n
    for n in $(find "$(realpath "$1")/" -path '*/input/input*/name' 2> /dev/null); do
        cat "$n"
    done | tr '\n' ';'
}

rk_count() { # count words
    echo $# 
}

rk_storage_io() { # PREFIX VHCI_DEVICE_DIR
    # Writes /host/pattern_a.bin at offset 0 of the device's disk, reads it back (page cache
    # dropped) and reads RK_B_MB MiB at RK_B_OFFSET_MB; records sha256s and timings.
    local p b mb_a
    p=$1
    b=$(rk_wait_block "$2") || return 1
    rk_result "${p}_block" "$b"
    rk_result "${p}_size_bytes" "$(($(cat "/sys/class/block/$b/size") * 512))"
    mb_a=$(($(stat -c %s /host/pattern_a.bin) / 1048576))
    rk_mark "${p}_write_start"
    dd if=/host/pattern_a.bin of="/dev/$b" bs=1M conv=fsync 2> /dev/null \
        || rk_fail "writing /dev/$b failed"
    rk_mark "${p}_write_end"
    blockdev --flushbufs "/dev/$b"
    echo 3 > /proc/sys/vm/drop_caches
    rk_result "${p}_readback_sha256" \
        "$(dd if="/dev/$b" bs=1M count="$mb_a" 2> /dev/null | sha256sum | cut -d' ' -f1)"
    rk_mark "${p}_read_a_end"
    rk_result "${p}_region_b_sha256" \
        "$(dd if="/dev/$b" bs=1M skip="$RK_B_OFFSET_MB" count="$RK_B_MB" 2> /dev/null \
            | sha256sum | cut -d' ' -f1)"
    rk_mark "${p}_read_b_end"
}

rk_vhci_count() { # VID PID
    rk_count $(rk_usb_devices "$1" "$2" vhci)
}

rk_vhci_at_least() { # VID PID N
    [ "$(rk_vhci_count "$1" "$2")" -ge "$3" ]
}

rk_has_input() { # SYSFS_DEVICE_DIR
    [ -n "$(rk_input_names "$1")" ]
}

rk_hid_check() { # PREFIX PORT: export every local 0627:0001 (usb-kbd, usb-tablet), attach
    # them all through PORT, wait until all enumerate on vhci, record drivers + input names
    local p n i d
    p=$1
    n=0
    for d in $(rk_usb_devices 0627 0001 local); do
        rk_bind "${d##*/}" && rk_attach "$2" "${d##*/}" && n=$((n + 1))
    done
    rk_result "${p}_exported" "$n"
    rk_wait 30 rk_vhci_at_least 0627 0001 "$n" \
        || rk_fail "only $(rk_vhci_count 0627 0001) of $n HID devices on vhci"
    i=0
    for d in $(rk_usb_devices 0627 0001 vhci); do
        rk_wait 15 rk_has_input "$d" \
            || rk_fail "no input device below $d"
        rk_result "${p}_${i}_product" "$(cat "$d/product")"
        rk_result "${p}_${i}_drivers" "$(rk_interface_drivers "$d")"
        rk_result "${p}_${i}_inputs" "$(rk_input_names "$d")"
        i=$((i + 1))
    done
    rk_result "${p}_vhci_count" "$i"
}

rk_sourcesink_gadget() { # PATTERN: a Gadget Zero-like SourceSink gadget on dummy_hcd
    local g
    modprobe dummy_hcd || { rk_fail "modprobe dummy_hcd"; return 1; }
    modprobe usb_f_ss_lb || { rk_fail "modprobe usb_f_ss_lb"; return 1; }
    mountpoint -q /sys/kernel/config || mount -t configfs none /sys/kernel/config
    g=/sys/kernel/config/usb_gadget/rkzero
    mkdir "$g" || { rk_fail "configfs gadget mkdir"; return 1; }
    echo 0x0525 > "$g/idVendor"
    echo 0xa4a0 > "$g/idProduct"
    mkdir "$g/strings/0x409"
    echo rk-sourcesink > "$g/strings/0x409/serialnumber"
    echo usbip-gateway-tests > "$g/strings/0x409/manufacturer"
    echo "SourceSink on dummy_hcd" > "$g/strings/0x409/product"
    mkdir "$g/configs/c.1"
    mkdir "$g/functions/SourceSink.0"
    echo "$1" > "$g/functions/SourceSink.0/pattern"
    ln -s "$g/functions/SourceSink.0" "$g/configs/c.1/"
    echo "$(ls /sys/class/udc | head -n 1)" > "$g/UDC" || { rk_fail "gadget UDC bind"; return 1; }
    rk_result gadget_udc "$(cat "$g/UDC")"
}

rk_has_driver() { # SYSFS_INTERFACE_DIR
    test -e "$1/driver"
}

rk_devnode() { # SYSFS_DEVICE_DIR: /dev/bus/usb/BBB/DDD
    local b d
    read -r b < "$1/busnum"
    read -r d < "$1/devnum"
    printf '/dev/bus/usb/%03d/%03d\n' "$b" "$d"
}

rk_usbtest() { # PREFIX SYSFS_DEVICE_DIR CASES...: run testusb case by case
    # Records PREFIX_case_N = pass SECS | fail ERRNO MESSAGE | unsupported | timeout | rc=N
    # (testusb prints nothing for a case the driver answers EOPNOTSUPP).
    local p dev node c out rc
    p=$1
    dev=$2
    shift 2
    node=$(rk_devnode "$dev")
    rk_result "${p}_node" "$node"
    rk_result "${p}_drivers" "$(rk_interface_drivers "$dev")"
    for c in "$@"; do
        rk_result "${p}_case_$c" running
        sync
        out=$(timeout "${RK_USBTEST_CASE_TIMEOUT:-60}" /host/testusb -D "$node" -t "$c" \
            -c "${RK_USBTEST_COUNT:-100}" -s "${RK_USBTEST_SIZE:-1024}" \
            -v "${RK_USBTEST_VARY:-512}" -g "${RK_USBTEST_SGLEN:-8}" 2>> /host/testusb.err)
        rc=$?
        echo "case $c rc=$rc: $out" >> /host/testusb.out
        case "$out" in
            *"test $c,"*) rk_result "${p}_case_$c" "pass $(echo "$out" | sed -n 's/.*test [0-9]*, *\([0-9.]*\) secs.*/\1/p')" ;;
            *"test $c -->"*) rk_result "${p}_case_$c" "fail $(echo "$out" | sed -n 's/.*--> //p')" ;;
            *)
                if [ "$rc" -eq 143 ] || [ "$rc" -eq 124 ]; then
                    rk_result "${p}_case_$c" "timeout"
                elif [ "$rc" -eq 0 ]; then
                    rk_result "${p}_case_$c" "unsupported"
                else
                    rk_result "${p}_case_$c" "rc=$rc"
                fi
                ;;
        esac
        # A failed case may leave the device gone (e.g. the connection dropped).
        if ! test -e "$dev/devnum"; then
            rk_result "${p}_device_lost_after" "$c"
            break
        fi
    done
}

# The host's root, shared read-only over 9p (Guest(host_root=True)), as a chroot in which
# the host's Python runs: the guest's /proc, /sys and /dev bound in, tmpfs on /run and /tmp
# (usbip attach records ports in /var/run/vhci_hcd).
RK_HOSTROOT=/hostroot

rk_hostroot_mount() {
    local d
    mkdir -p "$RK_HOSTROOT"
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=loose,ro \
        hostroot "$RK_HOSTROOT" || { rk_fail "cannot mount the 9p share 'hostroot'"; return 1; }
    mount -t proc proc "$RK_HOSTROOT/proc" || { rk_fail "hostroot: mount proc"; return 1; }
    for d in sys dev; do
        mount -o bind "/$d" "$RK_HOSTROOT/$d" || { rk_fail "hostroot: bind /$d"; return 1; }
    done
    # Fresh /run and /tmp for the guest, but the checkout may live under one of them
    # (CI clones anywhere): keep it aside and put it back on top.
    mkdir -p /rk-repo
    mount -o bind "$RK_HOSTROOT$RK_REPO" /rk-repo || { rk_fail "hostroot: keep $RK_REPO"; return 1; }
    for d in run tmp; do
        mount -t tmpfs tmpfs "$RK_HOSTROOT/$d" || { rk_fail "hostroot: tmpfs /$d"; return 1; }
    done
    mkdir -p "$RK_HOSTROOT$RK_REPO" 2> /dev/null
    mount -o bind /rk-repo "$RK_HOSTROOT$RK_REPO" || { rk_fail "hostroot: put back $RK_REPO"; return 1; }
    mkdir -p "$RK_HOSTROOT/run/vhci_hcd"
}

rk_hostroot_run() { # CMD...: run CMD in the host's root (cwd $RK_REPO), with a clean env
    chroot "$RK_HOSTROOT" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
        /bin/sh -c 'cd "$0" && exec "$@"' "$RK_REPO" "$@"
}

rk_storage_pass() { # PREFIX PORT BUSID SLOT: one timed pass over an exported stick
    # Attaches BUSID through 10.0.2.2:PORT, writes /tmp/pattern.bin at SLOT times its size
    # (fsync'd), reads RK_B_MB MiB at RK_B_OFFSET_MB to /dev/null with the page cache
    # dropped before, then checksums that region from the page cache the read filled (so
    # the checksum costs no transfer and stays out of the timed read), detaches and waits
    # until usbip-host offers BUSID again. Marks: PREFIX_{attached,written,read_start,
    # read_end,released}; result PREFIX_read_sha256.
    local p dev b mb
    p=$1
    rk_attach "$2" "$3" || return 1
    dev=$(rk_vhci_device 46f4 0001) || return 1
    b=$(rk_wait_block "$dev") || return 1
    mb=$(($(stat -c %s /tmp/pattern.bin) / 1048576))
    rk_mark "${p}_attached"
    dd if=/tmp/pattern.bin of="/dev/$b" bs=1M seek=$(($4 * mb)) conv=fsync 2> /dev/null \
        || rk_fail "$p: writing /dev/$b failed"
    rk_mark "${p}_written"
    blockdev --flushbufs "/dev/$b"
    echo 3 > /proc/sys/vm/drop_caches
    rk_mark "${p}_read_start"
    dd if="/dev/$b" of=/dev/null bs=1M skip="$RK_B_OFFSET_MB" count="$RK_B_MB" 2> /dev/null \
        || rk_fail "$p: reading /dev/$b failed"
    rk_mark "${p}_read_end"
    rk_result "${p}_read_sha256" "$(dd if="/dev/$b" bs=1M skip="$RK_B_OFFSET_MB" \
        count="$RK_B_MB" 2> /dev/null | sha256sum | cut -d' ' -f1)"
    rk_detach "$dev" || return 1
    rk_wait 30 grep -qx 1 "/sys/bus/usb/devices/$3/usbip_status" \
        || { rk_fail "$p: usbip-host did not release $3 after detach"; return 1; }
    rk_mark "${p}_released"
}

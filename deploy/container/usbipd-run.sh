#!/bin/sh
# usbipd-run: load usbip-host, run the kernel's usbipd on an unexposed port, bind the
# configured devices (and keep binding them as they are plugged in), give them back on exit.
#
# Environment:
#   USBIPD_PORT            usbipd's TCP port (default 3241). Never publish it: the gateway
#                          beside this container is the only way in.
#   USBIPD_MODPROBE        1 (default): modprobe usbip-host first (needs the host's /lib/modules)
#   USBIPD_BIND            what to export, space separated: bus ids (1-1.4) and/or VID:PID
#                          patterns (0781:5583, 0781:*). Empty (default): bind nothing here.
#   USBIPD_RESCAN          seconds between binding passes (default 10; 0: one pass at start)
#   USBIPD_UNBIND_ON_EXIT  1 (default): on SIGTERM, unbind what this script bound, so the
#                          host's own drivers get the devices back
set -eu

port="${USBIPD_PORT:-3241}"
bind_spec="${USBIPD_BIND:-}"
rescan="${USBIPD_RESCAN:-10}"
state="${TMPDIR:-/tmp}/usbipd-run.bound"
driver=/sys/bus/usb/drivers/usbip-host

log() { echo "usbipd-run: $*" >&2; }

wanted() {  # busid usbid -> status 0 if USBIPD_BIND names it
    for token in $bind_spec; do
        [ "$token" = "$1" ] && return 0
        # shellcheck disable=SC2254  # the token is a glob on purpose (0781:*)
        case "$2" in $token) return 0 ;; esac
    done
    return 1
}

bind_pass() {
    [ -n "$bind_spec" ] || return 0
    usbip list -p -l 2>/dev/null | while IFS='#' read -r busid_field usbid_field _; do
        busid="${busid_field#busid=}"
        usbid="${usbid_field#usbid=}"
        [ -n "$busid" ] || continue
        wanted "$busid" "$usbid" || continue
        [ -e "$driver/$busid" ] && continue
        if usbip bind -b "$busid" >/dev/null 2>&1; then
            echo "$busid" >>"$state"
            log "bound $busid ($usbid)"
        else
            log "could not bind $busid ($usbid)"
        fi
    done
}

stop() {
    trap - TERM INT
    if [ "${USBIPD_UNBIND_ON_EXIT:-1}" = 1 ] && [ -f "$state" ]; then
        sort -u "$state" | while read -r busid; do
            usbip unbind -b "$busid" >/dev/null 2>&1 && log "unbound $busid"
        done
        rm -f "$state"
    fi
    [ -n "${usbipd_pid:-}" ] && kill "$usbipd_pid" 2>/dev/null
    [ -n "${binder_pid:-}" ] && kill "$binder_pid" 2>/dev/null
    exit 0
}

if [ "${USBIPD_MODPROBE:-1}" = 1 ]; then
    modprobe usbip-host || { log "modprobe usbip-host failed (is /lib/modules mounted?)"; exit 1; }
fi
: >"$state"
trap stop TERM INT

usbipd --tcp-port "$port" &
usbipd_pid=$!
log "usbipd (pid $usbipd_pid) on port $port; binding: ${bind_spec:-nothing}"

bind_pass
if [ "$rescan" != 0 ]; then
    (while sleep "$rescan"; do bind_pass; done) &
    binder_pid=$!
fi

wait "$usbipd_pid" || status=$?
log "usbipd exited (status ${status:-0})"
stop

#!/bin/sh
# usbipd-guard: in the current network namespace, drop every TCP packet for usbipd's port
# that does not arrive on loopback, for IPv4 and IPv6. Needs CAP_NET_ADMIN only.
# Run it in the pod's network namespace (an init container), never in the host's.
#
# Connections from inside the namespace to any of its own addresses travel over loopback,
# so the gateway beside usbipd still reaches it; nothing from another pod or host does.
set -eu

port="${USBIPD_PORT:-3241}"
case "$port" in
    '' | *[!0-9]*) echo "usbipd-guard: USBIPD_PORT must be a number, not '$port'" >&2; exit 2 ;;
esac

# "table" then "delete table" makes a re-run replace the rules instead of adding to them.
nft -f - <<RULES
table inet usbipd_guard
delete table inet usbipd_guard
table inet usbipd_guard {
    chain input {
        type filter hook input priority filter - 10; policy accept;
        iifname != "lo" tcp dport $port counter drop
    }
}
RULES

# Prove it is in place: a guard that silently did nothing would be worse than none.
if ! nft list chain inet usbipd_guard input | grep -q "tcp dport $port .*drop"; then
    echo "usbipd-guard: the rule for port $port is not in place" >&2
    exit 1
fi
echo "usbipd-guard: non-loopback TCP to port $port is dropped in this network namespace" >&2

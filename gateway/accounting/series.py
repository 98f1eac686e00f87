"""URB accounting for the relay's hot path: plain counters behind one lock, no label lookups.

The per-URB path only adds to integers held in pre-bound `UrbSeries` objects (one per
device label value, transfer type and direction); the Prometheus families are built
from them when scraped. Relay threads write the series (sessions of one device share
them) while /metrics reads them from the Trio thread, and an import adds a device's
series at any time: one lock per table covers all of it, and a scrape copies the series
under it, so a scrape never sees a table changing size nor a URB half counted. That keeps
a completed URB to one uncontended lock, one `bisect` and a handful of additions, about
a fifth of what locked `prometheus_client` children cost.
"""

from __future__ import annotations

import threading
from typing import Literal

from gateway.accounting.rtt import SLOTS, RttSketch, coarse_index, fine_index
from gateway.protocol import DeviceInfo, PendingUrb, RetSubmit, TransferType

DeviceLabelMode = Literal["none", "busid", "vidpid"]
DEVICE_LABEL_MODES: tuple[DeviceLabelMode, ...] = ("none", "busid", "vidpid")
OTHER_DEVICE = "other"  # every device past the cap
UNKNOWN_DEVICE = "unknown"  # vidpid asked for, only a bus id known

#: Label values by `TransferType` value, and by `Direction` value.
TRANSFER_TYPES: tuple[str, ...] = tuple(t.name.lower() for t in TransferType)
DIRECTIONS: tuple[str, ...] = ("out", "in")
SLOTS_PER_DEVICE = len(TRANSFER_TYPES) * len(DIRECTIONS)


class UrbSeries:
    """Counts for one (device, transfer type, direction): what the metric children hold."""

    __slots__ = (
        "buckets",
        "data_bytes",
        "error",
        "iso_errors",
        "iso_packets",
        "ok",
        "rtt_sum",
        "unlinked",
    )

    def __init__(self) -> None:
        self.buckets = [0] * SLOTS  # not cumulative; the last is +Inf
        self.rtt_sum = 0.0
        self.ok = 0
        self.error = 0
        self.unlinked = 0
        self.data_bytes = 0
        self.iso_packets = 0
        self.iso_errors = 0

    @property
    def completed(self) -> int:
        """URBs with an RTT sample: answered by a RET_SUBMIT and not cancelled."""
        return sum(self.buckets)

    def copy(self) -> UrbSeries:
        twin = UrbSeries()
        twin.buckets = self.buckets.copy()
        twin.rtt_sum = self.rtt_sum
        twin.ok = self.ok
        twin.error = self.error
        twin.unlinked = self.unlinked
        twin.data_bytes = self.data_bytes
        twin.iso_packets = self.iso_packets
        twin.iso_errors = self.iso_errors
        return twin


class DeviceLabeler:
    """Maps a device to its bounded label value, or to nothing when the label is off."""

    def __init__(self, mode: DeviceLabelMode = "none", limit: int = 64) -> None:
        if mode not in DEVICE_LABEL_MODES:
            raise ValueError(f"device label mode {mode!r} is not one of {DEVICE_LABEL_MODES}")
        if limit < 1:
            raise ValueError("the device label limit must be positive")
        self.mode: DeviceLabelMode = mode
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()  # imports in relay threads, policy decisions in Trio

    @property
    def enabled(self) -> bool:
        return self.mode != "none"

    def label(self, busid: str, device: DeviceInfo | None = None) -> str:
        """The label value: "" when off, "other" once `limit` distinct values were seen."""
        if self.mode == "none":
            return ""
        if self.mode == "busid":
            value = busid or (device.busid if device is not None else "") or UNKNOWN_DEVICE
        elif device is not None:
            value = f"{device.id_vendor:04x}:{device.id_product:04x}"
        else:
            value = UNKNOWN_DEVICE
        with self._lock:
            if value in self._seen:
                return value
            if len(self._seen) >= self.limit:
                return OTHER_DEVICE
            self._seen.add(value)
            return value


class SeriesTable:
    """Every `UrbSeries` of one gateway, by device label value and slot.

    `lock` guards the table and every series in it: whoever writes a series holds it.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._devices: dict[str, list[UrbSeries | None]] = {}

    def slots(self, device: str) -> list[UrbSeries | None]:
        with self.lock:
            slots = self._devices.get(device)
            if slots is None:
                slots = self._devices[device] = [None] * SLOTS_PER_DEVICE
            return slots

    def items(self) -> list[tuple[str, str, str, UrbSeries]]:
        """(device, transfer type, direction, series) for every series in use: copies,
        taken at one instant."""
        with self.lock:
            return [
                (device, TRANSFER_TYPES[i >> 1], DIRECTIONS[i & 1], series.copy())
                for device, slots in self._devices.items()
                for i, series in enumerate(slots)
                if series is not None
            ]


class SessionMeter:
    """One session's URB accounting: its RTT sketch and its device's series.

    `completed` and `unlinked` run once per URB, from `Session.observe`.
    """

    __slots__ = ("device", "labeler", "lock", "rtt", "slots", "table")

    def __init__(self, table: SeriesTable, labeler: DeviceLabeler) -> None:
        self.table = table
        self.lock = table.lock
        self.labeler = labeler
        self.rtt = RttSketch()
        self.device = ""
        self.slots = table.slots("")

    def imported(self, busid: str, device: DeviceInfo | None) -> None:
        """The import succeeded: use the device's series from now on."""
        self.device = self.labeler.label(busid, device)
        self.slots = self.table.slots(self.device)

    def _bind(self, index: int) -> UrbSeries:
        series = self.slots[index] = UrbSeries()
        return series

    def completed(self, urb: PendingUrb, ret: RetSubmit, now: float) -> None:
        """A RET_SUBMIT for `urb` was seen at `now`."""
        index = urb.transfer_type * 2 + urb.direction
        status = ret.status
        with self.lock:
            series = self.slots[index] or self._bind(index)
            if status and urb.unlinked:
                # Cancelled by the unlink that raced it: the time measures the unlink.
                series.unlinked += 1
            else:
                rtt = now - urb.submitted_at
                fine = fine_index(rtt)
                self.rtt.counts[fine] += 1
                series.buckets[coarse_index(fine)] += 1
                series.rtt_sum += rtt
                if status:
                    series.error += 1
                else:
                    series.ok += 1
                series.data_bytes += ret.actual_length
            if urb.iso:
                series.iso_packets += ret.number_of_packets
                errors = ret.error_count
                if not errors:
                    for packet in ret.iso_packets:
                        if packet.status:
                            errors += 1
                series.iso_errors += errors

    def unlinked(self, urb: PendingUrb) -> None:
        """A RET_UNLINK ended `urb` before it completed: no RTT sample."""
        index = urb.transfer_type * 2 + urb.direction
        with self.lock:
            (self.slots[index] or self._bind(index)).unlinked += 1

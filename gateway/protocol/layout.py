"""Which endpoints the device has right now, as usbcore on the exporting host sees them.

usbip-host frames a CMD_SUBMIT by the endpoint it finds on the device (`get_pipe()` in
stub_rx.c): an endpoint it does not find gets no payload read, a non-isochronous one no
ISO descriptors, whatever the header says. A relay that cut the stream otherwise would
hand the kernel bytes it took for payload as the next header. So the gateway keeps the
same view: the configurations (from the device's descriptors, read from sysfs or seen
in the session), the active configuration and each interface's alternate setting.

The layout is a set of possibilities, not one guess. A SET_CONFIGURATION or
SET_INTERFACE in flight (the stub carries it out when it reads the command, before it
answers) or one that failed (the stub then also passes the request to the device, so
the reply does not tell whether usbcore switched) leaves both the old and the new
setting possible; a reply with status 0 settles it, and so does an authoritative
reading (`confirm`, from sysfs). An endpoint whose framing differs between the
possibilities is UNKNOWN, and the codec refuses URBs for it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .constants import Direction, TransferType
from .descriptors import (
    DESC_CONFIGURATION,
    GET_DESCRIPTOR,
    SET_CONFIGURATION,
    SET_INTERFACE,
    AltSetting,
    Configuration,
    Setup,
    parse_configuration,
)

# The stub's own tests (stub_rx.c is_set_configuration_cmd / is_set_interface_cmd):
# exact bmRequestType, so an IN-flagged look-alike is passed to the device untouched.
_SET_CONFIGURATION_TYPE = 0x00
_SET_INTERFACE_TYPE = 0x01

#: Absent: the device has no such endpoint in any possible state.
ABSENT = None
_MISSING = object()


@dataclass(frozen=True, slots=True)
class LayoutChange:
    """A SET_CONFIGURATION (interface None) or SET_INTERFACE the stub carries out."""

    configuration: int | None
    interface: int | None
    alternate: int


def layout_change(setup: Setup) -> LayoutChange | None:
    """The change `setup` asks the stub to make, if it is one of the intercepted two."""
    if setup.request == SET_CONFIGURATION and setup.request_type == _SET_CONFIGURATION_TYPE:
        # usb_set_configuration takes wValue as an int; only 0..255 can match a config.
        return LayoutChange(setup.value, None, 0)
    if setup.request == SET_INTERFACE and setup.request_type == _SET_INTERFACE_TYPE:
        return LayoutChange(None, setup.index, setup.value)
    return None


class DeviceLayout:
    """The possible endpoint sets of one imported device."""

    def __init__(self, configuration_value: int = 0) -> None:
        self._configs: dict[int, Configuration] = {}
        # Possible active configurations; 0 is "unconfigured" (only endpoint 0).
        self._active: set[int] = {configuration_value}
        # Possible alt settings per (configuration, interface); missing means "any".
        self._alts: dict[tuple[int, int], set[int]] = {}
        self._cache: dict[int, TransferType | None] = {}
        self.authoritative = False  # loaded from the device's own sysfs

    # -- what the codec asks

    def transfer_type(self, ep: int, direction: Direction) -> TransferType | None:
        """The endpoint's type; None if the device has no such endpoint; UNKNOWN if
        the gateway cannot tell (not learned yet, or different in possible states)."""
        if ep == 0:
            return TransferType.CONTROL
        key = ep << 1 | direction  # ints: an Enum's hash is Python code, and this is per URB
        kind = self._cache.get(key, _MISSING)
        if kind is not _MISSING:
            return kind  # type: ignore[return-value]
        kinds: set[TransferType | None] = set()
        for value in self._active:
            kinds |= self._kinds_in(value, ep, direction)
        kind = kinds.pop() if len(kinds) == 1 else TransferType.UNKNOWN
        self._cache[key] = kind
        return kind

    def interfaces(self) -> tuple[AltSetting, ...]:
        """The alt setting of each interface where only one is possible (for metrics)."""
        if len(self._active) != 1:
            return ()
        (value,) = self._active
        config = self._configs.get(value)
        if config is None:
            return ()
        return tuple(
            a for a in config.alts if self._possible_alts(value, a.interface) == {a.alternate}
        )

    @property
    def active_configuration(self) -> int | None:
        return next(iter(self._active)) if len(self._active) == 1 else None

    # -- what it learns

    def load(
        self,
        configurations: Iterable[Configuration],
        active: int,
        alternates: Mapping[int, int],
    ) -> None:
        """The device's own state, read where it is certain (sysfs at import)."""
        self._configs = {c.value: c for c in configurations}
        self.authoritative = True
        self.confirm(active, alternates)

    def confirm(self, active: int, alternates: Mapping[int, int]) -> None:
        """The active configuration and alt settings as the exporting host reports them."""
        self._active = {active}
        self._alts = {(active, i): {a} for i, a in alternates.items()}
        for interface in self._interface_numbers(active):
            self._alts.setdefault((active, interface), {0})
        self._cache.clear()

    def learn_configuration(self, data: bytes) -> None:
        """A configuration descriptor set seen in the session (GET_DESCRIPTOR's reply).

        Ignored once the layout is authoritative: the device's sysfs copy is what
        usbcore parsed, a reply in the session is only what the device said this time.
        """
        if self.authoritative:
            return
        parsed = parse_configuration(data)
        if parsed is not None:
            self._configs[parsed.value] = parsed
            self._cache.clear()

    def submitted(self, change: LayoutChange) -> None:
        """The stub will act on `change` when it reads it: both outcomes are possible."""
        if change.interface is None:
            assert change.configuration is not None
            self._active.add(change.configuration)
            for interface in self._interface_numbers(change.configuration):
                self._alts.setdefault((change.configuration, interface), set()).add(0)
        else:
            for value in self._active:
                if self._has_alt(value, change.interface, change.alternate):
                    self._alts.setdefault((value, change.interface), set()).add(change.alternate)
        self._cache.clear()

    def completed(self, change: LayoutChange, status: int) -> None:
        """The stub answered `change`; status 0 means usbcore made it (the stub answers 0
        exactly when its own call succeeded, or when the device accepted it after that
        call failed: the second case is why sysfs confirmation exists)."""
        if status != 0:
            return  # old or new: stays as `submitted` left it
        if change.interface is None:
            assert change.configuration is not None
            value = change.configuration
            self._active = {value}
            self._alts = {(value, i): {0} for i in self._interface_numbers(value)}
        else:
            for value in self._active:
                if self._has_alt(value, change.interface, change.alternate):
                    self._alts[(value, change.interface)] = {change.alternate}
        self._cache.clear()

    def control_completed(self, setup: Setup, status: int, data: bytes) -> None:
        if status != 0 or setup.kind != 0:
            return
        if (
            setup.request == GET_DESCRIPTOR
            and setup.is_in
            and setup.value >> 8 == DESC_CONFIGURATION
        ):
            self.learn_configuration(data)

    # -- internals

    def _interface_numbers(self, value: int) -> set[int]:
        config = self._configs.get(value)
        return set() if config is None else {a.interface for a in config.alts}

    def _has_alt(self, value: int, interface: int, alternate: int) -> bool:
        config = self._configs.get(value)
        if config is None:
            return False
        return any(a.interface == interface and a.alternate == alternate for a in config.alts)

    def _possible_alts(self, value: int, interface: int) -> set[int]:
        known = self._alts.get((value, interface))
        if known is not None:
            return known
        config = self._configs.get(value)
        return (
            set()
            if config is None
            else {a.alternate for a in config.alts if a.interface == interface}
        )

    def _kinds_in(self, value: int, ep: int, direction: Direction) -> set[TransferType | None]:
        """The endpoint's possible types when configuration `value` is active."""
        if value == 0:
            return {ABSENT}
        config = self._configs.get(value)
        if config is None or config.irregular is not None:
            return {TransferType.UNKNOWN}
        address = ep | (0x80 if direction == Direction.IN else 0)
        kinds: set[TransferType | None] = set()
        for interface in {a.interface for a in config.alts}:
            possible = self._possible_alts(value, interface)
            owner = False
            here: set[TransferType | None] = set()
            for alt in config.alts:
                if alt.interface != interface or alt.alternate not in possible:
                    continue
                kind = _endpoint_kind(alt, address)
                here.add(kind)
                owner = owner or kind is not ABSENT
            if owner:
                kinds |= here
        return kinds or {ABSENT}


def _endpoint_kind(alt: AltSetting, address: int) -> TransferType | None:
    """usbcore files a control endpoint under both directions (usb_enable_endpoint)."""
    for e in alt.endpoints:
        if e.address == address:
            return e.transfer_type
        if e.transfer_type is TransferType.CONTROL and e.number == address & 0x0F:
            return TransferType.CONTROL
    return ABSENT

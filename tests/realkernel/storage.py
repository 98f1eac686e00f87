"""A raw disk image for QEMU's usb-storage stick, with known patterns to check against."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

MIB = 1 << 20


@dataclass(frozen=True)
class StorageImage:
    """Image file of `size_mb` MiB. Region B (`b_mb` MiB at `b_offset_mb`) is pre-filled
    with random data; pattern A (`a_mb` MiB, a separate file) is what the guest writes at
    offset 0 through usbip."""

    image: Path
    pattern_a: Path
    a_mb: int
    b_offset_mb: int
    b_mb: int
    pattern_a_sha256: str
    region_b_sha256: str

    @classmethod
    def create(
        cls,
        directory: Path,
        *,
        size_mb: int = 64,
        a_mb: int = 8,
        b_offset_mb: int = 32,
        b_mb: int = 8,
        seed: int = 1,
    ) -> StorageImage:
        rng = random.Random(seed)
        pattern_a = b"".join(rng.randbytes(MIB) for _ in range(a_mb))
        image = directory / "stick.img"
        region_b = hashlib.sha256()
        with image.open("wb") as fh:
            fh.truncate(size_mb * MIB)
            fh.seek(b_offset_mb * MIB)
            for _ in range(b_mb):  # a MiB at a time: randbytes stops below 256 MiB
                chunk = rng.randbytes(MIB)
                region_b.update(chunk)
                fh.write(chunk)
        pa = directory / "pattern_a.bin"
        pa.write_bytes(pattern_a)
        return cls(
            image=image,
            pattern_a=pa,
            a_mb=a_mb,
            b_offset_mb=b_offset_mb,
            b_mb=b_mb,
            pattern_a_sha256=hashlib.sha256(pattern_a).hexdigest(),
            region_b_sha256=region_b.hexdigest(),
        )

    def params(self) -> dict[str, str | int]:
        return {"RK_B_OFFSET_MB": self.b_offset_mb, "RK_B_MB": self.b_mb}

    def image_region_a_sha256(self) -> str:
        """sha256 of the image's first a_mb MiB as it is on the host now."""
        return self.image_sha256(0, self.a_mb)

    def image_sha256(self, offset_mb: int, mb: int) -> str:
        """sha256 of `mb` MiB at `offset_mb` of the image as it is on the host now."""
        with self.image.open("rb") as fh:
            fh.seek(offset_mb * MIB)
            return hashlib.sha256(fh.read(mb * MIB)).hexdigest()

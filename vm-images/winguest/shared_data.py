"""KUSER_SHARED_DATA: the page every process sees at 0x7FFE0000 (kernel: 0xFFFFF78000000000)."""
from __future__ import annotations

import struct

KERNEL_VA = 0xFFFFF78000000000
USER_VA = 0x7FFE0000


def versions(build: int) -> tuple[int, int]:
    if build < 9200:
        return 6, 1
    if build < 9600:
        return 6, 2
    return (6, 3) if build < 10240 else (10, 0)


def kuser_shared_data(build: int, ram_pages: int, systime: int, ncpus: int) -> bytes:
    b = bytearray(0x1000)
    struct.pack_into("<I", b, 0x04, 0x0FA00000)                 # TickCountMultiplier
    struct.pack_into("<IiI", b, 0x08, 0x2A5D1C3E, 0x1, 0x1)     # InterruptTime
    struct.pack_into("<IiI", b, 0x14, systime & 0xFFFFFFFF, systime >> 32, systime >> 32)
    struct.pack_into("<HH", b, 0x2C, 0x8664, 0x8664)            # ImageNumberLow/High
    root = "C:\\Windows".encode("utf-16-le")
    b[0x30:0x30 + len(root)] = root                             # NtSystemRoot
    struct.pack_into("<I", b, 0x244, 0x200000)                  # LargePageMinimum
    if build >= 10240:
        struct.pack_into("<I", b, 0x260, build)                 # NtBuildNumber
    struct.pack_into("<IBBH", b, 0x264, 1, 1, 0, 9)             # NtProductType, valid, AMD64
    major, minor = versions(build)
    struct.pack_into("<II", b, 0x26C, major, minor)             # NtMajorVersion, NtMinorVersion
    struct.pack_into("<I", b, 0x2E8, ram_pages)                 # NumberOfPhysicalPages
    struct.pack_into("<I", b, 0x3C0, ncpus)                     # ActiveProcessorCount
    return bytes(b)

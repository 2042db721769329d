"""Camera file names as the line meets them, and the names of what it writes about them.

On Linux a file name is bytes: it may not be UTF-8 and may be up to 255 bytes long. Python
hands such a name over with the undecodable bytes as surrogate escapes, which no UTF-8 writer
(CSV, MQTT, OPC UA, a browser) accepts. So a name is *shown* as valid UTF-8 with each
undecodable byte written `\\xNN` (`printable`), and every file the line derives from a camera
file (overlay, mask, rejected copy) gets a name that is valid UTF-8, fits the file system next
to a temporary suffix, and stays unique: a name that had to be escaped or shortened carries a
hash of the exact original bytes (`safe_part`).
"""

from __future__ import annotations

import hashlib
import os

NAME_MAX = 255  # bytes in one path component on every file system a line uses
# the longest component we derive: room for write_atomic's ".NAME.partial" and a "-<sha12>"
SAFE_NAME_BYTES = NAME_MAX - 40
DIGEST_CHARS = 12


def name_bytes(text: str) -> bytes:
    """The exact bytes of a name Python decoded from the file system."""
    return os.fsencode(text)


def printable(text: str) -> str:
    """`text` as valid UTF-8: bytes that were not UTF-8 shown as `\\xNN`, the rest unchanged."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate not from the file system: show it escaped
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def is_printable(text: str) -> bool:
    return printable(text) == text


def name_digest(text: str) -> str:
    """A short hash of a name's exact bytes: what keeps a shortened name unique."""
    return hashlib.sha256(name_bytes(text)).hexdigest()[:DIGEST_CHARS]


def truncated(text: str, limit: int) -> str:
    """The longest prefix of `text` whose UTF-8 form has at most `limit` bytes."""
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore")


def safe_part(name: str, suffix: str = "", limit: int = SAFE_NAME_BYTES) -> str:
    """`name + suffix` if that is printable and fits `limit` bytes; otherwise the printable
    name cut short, a `~` and the hash of the original `name`, then `suffix`."""
    whole = name + suffix
    if is_printable(whole) and len(whole.encode("utf-8")) <= limit:
        return whole
    tail = f"~{name_digest(name)}{printable(suffix)}"
    return truncated(printable(name), limit - len(tail.encode("utf-8"))) + tail

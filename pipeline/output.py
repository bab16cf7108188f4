"""Text as the `pipeline` command prints it: names and labels escaped so that they cannot forge output lines."""

from __future__ import annotations

from serve.files import UNDECODABLE_BYTES

# Control characters in a label or a path could forge output lines: they are printed escaped.
_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)]} | {
    0x09: "\\t",
    0x0A: "\\n",
    0x0D: "\\r",
    0x2028: "\\u2028",
    0x2029: "\\u2029",
}
_ESCAPES |= UNDECODABLE_BYTES


def printable(text: str) -> str:
    """`text` with C0 and C1 control characters, DEL and the Unicode line separators escaped, as \\n or \\x1b,
    and the undecodable bytes of a file name as \\xff."""
    return text.translate(_ESCAPES)

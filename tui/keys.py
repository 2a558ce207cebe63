"""How terminal bytes become keys, where Textual's default is wrong for memchat.

xterm, GNOME Terminal, Alacritty, kitty and tmux send alt+digit as ESC then
the digit ("\\x1b1"). Textual maps those pairs to the characters macOS
WezTerm types for Option+digit (¡ ™ £ …), so alt+3 typed "£" into the
prompt instead of switching users. memchat reads the pairs as the keys
alt+0 … alt+9: they never insert text and bindings see them. A terminal that
sends the Option characters themselves (macOS Terminal without "Use Option as
Meta") still types them; F8/F9 switch users there.
"""

from __future__ import annotations

from dataclasses import dataclass

from textual import _ansi_sequences

ALT_DIGIT_SEQUENCES = {f"\x1b{n}": f"alt+{n}" for n in range(10)}


@dataclass(frozen=True, slots=True)
class _KeyName:
    """Stands in for a `Keys` member: the parser only reads `.value`."""

    value: str


def install_terminal_keys() -> None:
    """Make ESC+digit the key alt+digit (idempotent; this process only)."""
    for sequence, name in ALT_DIGIT_SEQUENCES.items():
        # Textual types the table as a read-only Mapping; at run time it is the
        # dict its parser reads, so an entry added here is a key it knows.
        keys = _ansi_sequences.ANSI_SEQUENCES_KEYS
        keys[sequence] = (_KeyName(name),)  # type: ignore[index]

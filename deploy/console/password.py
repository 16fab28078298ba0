"""Passwords for CLI commands: $DEFECTSCOPE_CONSOLE_PASSWORD, else stdin when it is not a terminal, else a prompt.

Scripts and CI have no terminal; ``getpass`` there raises EOFError. Every way a password can be
missing ends in one PasswordMissing line instead.
"""

from __future__ import annotations

import getpass
import os
import sys

ENV = "DEFECTSCOPE_CONSOLE_PASSWORD"
HELP = (
    f"The password is read from ${ENV} when set, else from the first line of stdin when stdin is "
    f"not a terminal, else prompted for."
)


class PasswordMissing(ValueError):
    """No password could be read; the message says how to give one."""


def read_password(prompt: str = "password: ", confirm: bool = False) -> str:
    env = os.environ.get(ENV)
    if env:
        return env
    if not sys.stdin.isatty():
        line = sys.stdin.readline()
        if not line.strip("\r\n"):
            raise PasswordMissing(f"no password: set ${ENV} or write it on stdin")
        return line.rstrip("\r\n")
    try:
        pw = getpass.getpass(prompt)
        if confirm and getpass.getpass("again: ") != pw:
            raise PasswordMissing("the passwords differ")
    except (EOFError, KeyboardInterrupt):
        raise PasswordMissing(f"no password: set ${ENV} or write it on stdin") from None
    return pw

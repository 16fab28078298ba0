"""The console test rig's fixtures (the bridge test runs a real console for the alarm webhook)."""

from tests.deploy.console import conftest as _console

console_factory = _console.console_factory
user_hashes = _console.user_hashes

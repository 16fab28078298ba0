"""The console's Prometheus metrics (``/metrics``): refused messages, dead letters, login refusals, alarms.

One registry per console (not the process default), so tests that build several apps in one
process count separately. Station labels are only configured station names (bounded).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

# Why a station message was refused (docs/contracts.md, "Line console").
REJECT_REASONS = ("schema", "too_large", "rate_limited", "foreign_station")
# Why a login was refused: wrong password / unknown user, a locked user or address, all hash slots busy.
LOGIN_REFUSALS = ("wrong_password", "locked_user", "locked_address", "busy")


class ConsoleMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.rejected = Counter(
            "defectscope_console_messages_rejected_total",
            "Station messages refused, by station and reason",
            ["station", "reason"],
            registry=self.registry,
        )
        self.dead_letters = Counter(
            "defectscope_console_dead_letters_total",
            "Verdict rows the database refused, kept in the dead_letters table",
            ["station"],
            registry=self.registry,
        )
        self.login_refused = Counter(
            "defectscope_console_login_refused_total", "Logins refused, by reason", ["reason"], registry=self.registry
        )
        self.hashes_in_flight = Gauge(
            "defectscope_console_login_hashes_in_flight", "argon2 verifications running now", registry=self.registry
        )
        self.hashes_peak = Gauge(
            "defectscope_console_login_hashes_peak",
            "Most argon2 verifications that ran at once since start",
            registry=self.registry,
        )
        self.bodies_refused = Counter(
            "defectscope_console_request_bodies_refused_total",
            "Requests refused (413) for a body over server.max_body_bytes",
            registry=self.registry,
        )

        self.alarms_open = Gauge(
            "defectscope_console_alarms_open",
            "Alarms shown in the banner: active, or cleared but not yet acknowledged",
            registry=self.registry,
        )
        self.alarms_unacknowledged = Gauge(
            "defectscope_console_alarms_unacknowledged", "Open alarms nobody acknowledged yet", registry=self.registry
        )
        self.alarm_events = Counter(
            "defectscope_console_alarm_events_total",
            "Alarm changes, by event (raised, cleared, acknowledged)",
            ["event"],
            registry=self.registry,
        )
        self.webhook_failed = Counter(
            "defectscope_console_alarm_webhook_failed_total",
            "Alarm webhook posts that failed (unreachable, timeout, HTTP error)",
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

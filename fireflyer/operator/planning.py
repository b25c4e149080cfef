"""What every controller's pure plan shares: the Events it asks for and the one timestamp format
Kubernetes uses in objects."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


@dataclass
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


def format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime(TIME_FORMAT)


def parse_time(text: str | None) -> datetime | None:
    """A timestamp as Kubernetes writes it; None when absent or unreadable."""
    if not text:
        return None
    try:
        return datetime.strptime(text, TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return None

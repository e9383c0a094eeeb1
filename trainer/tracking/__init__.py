"""Experiment tracking: one interface, one class per backend, registered by name."""

from trainer.tracking.base import (
    SampleEvent,
    SampleRecord,
    Tracker,
    TrackerContext,
    TrackerUnavailable,
    Tracking,
    check_available,
    register_tracker,
)

__all__ = [
    "SampleEvent",
    "SampleRecord",
    "Tracker",
    "TrackerContext",
    "TrackerUnavailable",
    "Tracking",
    "check_available",
    "register_tracker",
]

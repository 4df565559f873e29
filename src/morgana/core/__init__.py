"""Shared core of every Morgana deployable: settings, logging, telemetry."""

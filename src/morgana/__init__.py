"""Morgana: a voice-and-chat agent backend that runs natively on Kubernetes."""

__version__ = "0.1.0"

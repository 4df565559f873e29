"""Developer tooling: local stand-ins for external services (tests, ``make run``, benchmarks)."""

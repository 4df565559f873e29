"""HTTP routes: thin adapters from requests to the services."""

from typing import Any, TypeAlias

# The type of a route's `responses=` (extra OpenAPI responses, by status code).
Responses: TypeAlias = dict[int | str, dict[str, Any]]

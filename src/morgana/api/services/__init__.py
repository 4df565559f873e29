"""Business logic behind the routes, testable without HTTP."""

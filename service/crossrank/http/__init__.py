"""The HTTP layer: app, routes, schemas, the one error map, and middleware by concern."""

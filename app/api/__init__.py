"""The HTTP edge: request dependencies, schemas, middleware, the status table and the routers.
Status codes live here only; ``app.main`` assembles the FastAPI application from these parts."""

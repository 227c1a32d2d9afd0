"""Image sources, one module per kind. Each exposes a `Source` (see `etl.sources.base`)."""

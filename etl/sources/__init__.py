"""Image sources, one module per kind. Each exposes a `Source` (see `etl.sources.base`); the
registry (`etl.sources.registry.make_source`) builds the one the settings name."""

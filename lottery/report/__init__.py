"""A grid's report: read results (results), tables (tables), plots (plots), the report files (build)
and the progress of a running grid (progress)."""

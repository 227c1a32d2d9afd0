"""The `bigticket` console command: one entry point dispatching to each stage's CLI."""

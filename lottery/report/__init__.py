"""Reading a grid's results: tables, statistics, plots, progress and the report files."""

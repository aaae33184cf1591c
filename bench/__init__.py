"""Benchmarks for Conveyor: `make bench` (`python -m bench`) prints one table and writes
`bench/results.json` and `bench/RESULTS.md`. Not collected by pytest (testpaths is `tests`)."""

"""The shared benchmark harness: models (`models`), interleaved timing (`timing`), memory (`memory`) and results
files, tables, charts and the machine description (`report`). Scripts import from these modules; nothing here
imports a script."""

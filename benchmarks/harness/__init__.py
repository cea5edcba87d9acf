"""The shared benchmark harness: models (`models`), interleaved timing (`timing`), memory (`memory`), V1's attention
core six ways (`cores`), results files, tables, charts, the machine description and the studies' reports (`report`),
and for the training studies their one runner (`study`) and Trainer recipe (`training`). Scripts import from these
modules; nothing here imports a script."""

"""Training studies of the paper's claims at small scale, each a module with its settings beside it, run by the shared
study runner (`benchmarks.harness.study`)."""

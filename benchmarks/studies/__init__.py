"""Training studies of the paper's claims at small scale, on the shared study harness (`studies.harness`)."""

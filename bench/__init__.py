"""bench: everything around the networks: data, training, records, sweeps, profiling, reports."""

__version__ = "0.1.0"

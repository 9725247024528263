"""The error every data reader raises (bench.data for in-memory sets, bench.imagefolder for trees), in a
module of its own so that both can import it without importing each other."""


class DataError(Exception):
    """Data missing or unreadable; the message says where we looked and how to fix it."""

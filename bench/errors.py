"""The exceptions several layers share, in a module of their own (no torch): the error every data reader raises
(bench.data for in-memory sets, bench.imagefolder for trees), and the interruption of a training."""


class DataError(Exception):
    """Data missing or unreadable; the message says where we looked and how to fix it."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) while runs trained: what was training, at which step of how many. Each run resumes
    from its last checkpoint when the same command runs again."""

    def __init__(self, what: str, step: int, total: int):
        super().__init__(f"interrupted at step {step} of {total} ({what})")
        self.what, self.step, self.total = what, step, total

"""A stand-in for LeakEngine's in-process window calls (growth-mode unit tests):
it records each call; a snapshot reports 10 B per block, `n` blocks."""


class FakeEngine:
    def __init__(self):
        self.calls = []
        self.n = 0

    def open_window(self, *, freeze=True):
        self.calls.append("open")
        self.freeze = freeze     # growth mode's windows end with full collections: never frozen

    def close_window(self, *, collect=False):
        self.calls.append("close")

    def snapshot(self):
        self.calls.append("snapshot")
        return {"bytes": 10 * self.n, "blocks": self.n}

    def set_growth(self, warmup, repeat, per_repetition):
        self.calls.append(("growth", warmup, repeat, per_repetition))

"""What the trainer tests share: a stand-in for a kill at a chosen step."""


class Crash(Exception):
    """Stands for a kill: the run ends where it is, with nothing saved beyond its last checkpoint."""


def crash_after(n: int, seen: list):
    """A `run_steps` callback that records each step's statistics and raises Crash after step n."""
    def callback(done, stats):
        seen.append(stats)
        if done == n:
            raise Crash

    return callback

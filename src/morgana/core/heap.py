"""What the garbage collector walks in a long-running server process."""

import gc


def freeze_startup_objects() -> int:
    """Move every object alive after start-up (modules, classes, the app and its clients) out of
    the cyclic garbage collector's way, and return how many were moved.

    An API process holds about 295,000 such objects. Each full collection walked them all: a
    pause of 170-220 ms for every request and stream of the process, once every few thousand
    requests under load; with them frozen, a full collection takes 1-4 ms. They stay alive and
    are still freed by reference counting; only cycles among them are never collected.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()

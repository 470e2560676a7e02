"""Helpers shared by the training tests: stopping a run after an epoch, comparing histories."""


class Interrupt(Exception):
    """Raised by :func:`stop_after`'s hook, as a crash after an epoch's checkpoint would."""


def stop_after(n: int):
    """An ``on_epoch_end`` hook that interrupts training after epoch ``n``."""
    def hook(row):
        if row["epoch"] == n:
            raise Interrupt

    return hook


def strip_seconds(history: list[dict]) -> list[dict]:
    """A history without its wall-clock column (the only one that differs between equal runs)."""
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]

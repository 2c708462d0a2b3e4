"""Which images a run reads: the data folder, the validation split, a per-class limit."""
from __future__ import annotations

from dataclasses import dataclass

from ..common.settings import Settings, SettingsError, boolean, optional, setting, text, whole

__all__ = ["DataSettings", "parse_val_split", "val_split"]


def parse_val_split(value) -> float | int:
    """``"0.1"`` -> 0.1 (a fraction), ``"5000"`` -> 5000 (a count), None/``"0"`` -> 0 (no split)."""
    if value is None:
        return 0
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        text_value = value
    else:
        try:
            text_value = float(value)
        except (TypeError, ValueError):
            raise SettingsError(f"--val-split: expected a fraction in [0, 1) or a whole count, got {value!r}") from None
    if text_value >= 1 or text_value == 0:
        if text_value != int(text_value):
            raise SettingsError(f"--val-split: expected a fraction in [0, 1) or a whole count, got {value!r}")
        return int(text_value)
    if text_value < 0:
        raise SettingsError(f"--val-split: expected a fraction in [0, 1) or a whole count, got {value!r}")
    return text_value


def val_split(value, name: str) -> str:
    """The check of ``--val-split``: kept as the text given (``"5000"``, ``"0.1"``)."""
    parse_val_split(value)
    return str(value)


@dataclass(frozen=True)
class DataSettings(Settings):
    """Where the images come from and which of them a run trains and evaluates on."""

    data_dir: str | None = setting(None, optional(text), "CIFAR-10 folder (default: $CIFAR10_DIR, else ./data)")
    val_split: str = setting("0", val_split, "validation images carved from train: a fraction (0.1) or a count (5000); 0 for none")
    limit_per_class: int | None = setting(None, optional(whole(1)), "only the first N images of each class (smoke runs)")
    test: bool = setting(True, boolean, "evaluate on the test split each epoch")

"""The class vocabulary shared by discovery, the model card, metrics and reports.

The order is the model's output order; a checkpoint's card may restate it, and loading refuses a card
whose order differs, so an index always means the same class everywhere.
"""

CLASS_NAMES: tuple[str, ...] = ("normal", "benign", "malignant")


def class_index(name: str) -> int:
    """Index of a class name (case-insensitive); ValueError names the valid ones."""
    key = name.strip().lower()
    try:
        return CLASS_NAMES.index(key)
    except ValueError:
        raise ValueError(f"unknown class {name!r}; expected one of {', '.join(CLASS_NAMES)}") from None

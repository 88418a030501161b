"""Numbers that several layers must agree on."""

IGNORE_INDEX = -100  # label of a position that is not trained (PyTorch cross-entropy's default ignore_index)

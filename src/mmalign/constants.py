"""Numbers that several layers must agree on."""

END_OF_CHUNK = "<|endofchunk|>"  # ends a media chunk of an interleaved document (Flamingo's <EOC>)
IGNORE_INDEX = -100  # label of a position that is not trained (PyTorch cross-entropy's default ignore_index)

"""Storage-side layers: layout and names, atomic commit and the writer lease,
the ``.keras`` archive format, manifests, and backend error translation.

Nothing here imports TensorFlow: the Ray coordinator writes through these
modules without it.
"""

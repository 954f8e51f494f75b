"""Values every part of lmdistill agrees on."""

IGNORE_INDEX = -100  # a label that is not a target: torch's cross-entropy ignores it by default

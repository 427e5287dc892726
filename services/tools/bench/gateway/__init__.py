"""``make bench``: the standard load-test set against the local stack, with its references."""

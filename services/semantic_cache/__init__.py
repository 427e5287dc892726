"""L1 semantic cache: answers a question that was answered before, or one that means the same."""

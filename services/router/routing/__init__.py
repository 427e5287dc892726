"""The learned tier router: features, the shipped model, the cost-aware tier decision."""

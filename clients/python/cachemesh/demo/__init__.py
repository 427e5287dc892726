"""``python -m cachemesh.demo``: a short realistic workload through a running stack."""

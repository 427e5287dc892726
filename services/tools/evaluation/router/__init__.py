"""The learned tier router's fit, calibration and evaluation on the RouteLLM labels."""

"""The simulated LLM engine (cachemesh.v1.Model): a stand-in replica, not a real model."""

"""Replays of the agent and mixed workloads through the offline stack, by routing policy."""

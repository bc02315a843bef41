"""The planner layer (analysis only, never mutates a graph): liveness and
peak memory, the step plan across regions, recompute and residency
policies, bucket plans, and the measured side (the tracking interpreter)."""

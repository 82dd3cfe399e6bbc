"""The worker process's own state: its runtime, its liveness (heartbeat, reapers) and the sweep."""

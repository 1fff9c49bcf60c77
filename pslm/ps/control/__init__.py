"""The control plane: the scheduler (membership, heartbeats, barriers, leases, the shard
table, live control) and a node's side of it (registering, heartbeats). Starts without torch."""

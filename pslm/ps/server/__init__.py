"""One shard's server process: its request loop, and the decisions it executes (push intake
and exactly-once, the BSP round, SSP/ASP reads, replies, replication)."""

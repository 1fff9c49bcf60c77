"""The worker's side: ``PSClient`` (init, push, pull, push_pull, wait), how a push is encoded
and a reply scattered, failover, shared memory, the overlapped exchange, and readers."""

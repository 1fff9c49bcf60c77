"""What workers, servers and the scheduler agree on: the key space, the consistency models,
the optimizer's settings, live steering, the protocol and the push header. No sockets, no
threads."""

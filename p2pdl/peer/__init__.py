"""The Peer: ties model, strategy, transport and membership together; state transfer."""

"""Who is alive: the membership view and its gossip."""

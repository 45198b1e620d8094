"""Observability: Prometheus metrics, the swarm digest in the gossip, and the dashboard."""

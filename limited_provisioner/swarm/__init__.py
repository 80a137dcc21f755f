"""The Docker Swarm backend: one service per kernel, anywhere on a cluster."""

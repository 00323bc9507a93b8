"""m3serve: serve MiniMax-M3 to agent frameworks on Hopper GPUs."""

__version__ = "0.1.0"

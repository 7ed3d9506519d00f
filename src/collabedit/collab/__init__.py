"""Collaborative editing: what clients send, how the server merges it. Plain tensor math: nothing
here imports model code."""

"""Collaborative editing: what clients send (update.py, transport.py), how the server merges it
(merge.py: plain tensor math, no model code), and the one client round and one server round that
every entry point runs (setup.py, rounds.py, protocol.py, state.py)."""

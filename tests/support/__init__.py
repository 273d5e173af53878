"""Shared test helpers: a real mosquitto broker (`mosquitto.py`) and throw-away TLS material (`certs.py`)."""

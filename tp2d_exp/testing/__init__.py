"""Harnesses for tests and benchmarks: job specs composed from conf/ without run.py, local gloo ranks on
127.0.0.1, and a loopback multi-node Ray cluster."""

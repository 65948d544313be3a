"""Harnesses for tests and benchmarks (multi-node Ray clusters on one machine); not used by the platform."""

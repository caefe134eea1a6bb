"""Kernel tier: runs inside the qemu guest (tests/vm/run-guest-tests.sh)."""

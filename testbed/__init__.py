"""Orchard testbed: campaigns of emulated boards, throttling, traces, reports, and the CLI."""

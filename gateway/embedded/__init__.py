"""The runtime the gateway runs itself when no backend is configured: its supervisor and the
child's entry point.
"""

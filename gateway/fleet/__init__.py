"""The backends and their replicas: configuration, state, the one door to a replica
(``upstream``), discovery, probes, ejection, load reports.
"""

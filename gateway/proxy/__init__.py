"""The data path: a request read, checked, sent to a replica and its answer relayed
(``endpoint``), with what it reads and rewrites on the way.
"""

"""Which replica takes a request, as Envoy's cluster manager decides: the router, one request's
attempts, the balancers, the model catalogue, the retry budget.
"""

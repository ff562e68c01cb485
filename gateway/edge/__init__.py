"""The client's side of the wire: the HTTP/1.1 protocol with its limits and deadlines, one
request's answer, timers moved by every request, CORS.
"""

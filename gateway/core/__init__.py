"""What every part shares: one request's record, the error tree, the ASGI types, the
view of a JSON body and the vocabulary of headers."""

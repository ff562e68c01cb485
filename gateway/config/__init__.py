"""The settings: their fields, the backends file, how each is spelled as a flag, and the
reference made from them."""

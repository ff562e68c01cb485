"""Keys and what each may do: authentication, request and token limits, reservations, objects
sealed to their owner, the settings refused at start.
"""

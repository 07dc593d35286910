"""Test tooling that ships with the library but is not part of it: fault-injecting stores (``faulty``).

Layer: testing (top). May import: everything below.
"""

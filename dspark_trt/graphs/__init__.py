"""Graph contracts: what each engine graph takes and returns, and how a runtime feeds it.

Both the exporters (`export/`) and the runtimes (`runtimes/`) import from here, never from each other.
"""

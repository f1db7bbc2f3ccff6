"""Graph contracts: what each engine graph takes and returns and how a runtime feeds it, the engine
directory's manifest (reading it, checking its files) and the ONNX Runtime sessions that run the graphs.

Both the exporters (`export/`) and the runtimes (`runtimes/`) import from here, never from each other.
"""

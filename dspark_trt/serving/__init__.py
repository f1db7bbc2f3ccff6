"""Serving glue: launching tritonserver and (later) filling the Triton model repository."""
